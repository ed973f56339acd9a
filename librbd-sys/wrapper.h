/* The two headers the bindings come from (Debian: librados-dev, librbd-dev). */
#include <rados/librados.h>
#include <rbd/librbd.h>
