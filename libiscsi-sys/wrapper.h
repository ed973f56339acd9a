/* The libiscsi headers the bindings are generated from. iscsi.h uses types from
   stdint/stddef/time without including all of them itself. */
#include <stdint.h>
#include <stddef.h>
#include <time.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
