//! Command-line parsing in the style of getopt_long, which qemu-img uses: short options that
//! may be bundled (`-pU`), options with arguments (`-f qcow2`, `-fqcow2`), long options with
//! `=` or a separate argument, and `--` to end options. Positional arguments may appear
//! anywhere, as GNU getopt permutes them.

use crate::CliError;

/// One option the command accepts.
#[derive(Clone, Copy, Debug)]
pub struct OptSpec {
    /// Short letter, if any.
    pub short: Option<char>,
    /// Long name, if any.
    pub long: Option<&'static str>,
    /// Whether it takes an argument.
    pub has_arg: bool,
}

/// Shorthand for an option spec.
pub const fn opt(short: Option<char>, long: Option<&'static str>, has_arg: bool) -> OptSpec {
    OptSpec {
        short,
        long,
        has_arg,
    }
}

/// A parsed option: its canonical name (the long name, else the letter) and its argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Long name, or the short letter as a string.
    pub name: String,
    /// The argument, for options that take one.
    pub value: Option<String>,
}

/// Parses `args` (without the program and command name) against `specs`.
/// Returns options in order, and positional arguments.
pub fn parse(args: &[String], specs: &[OptSpec]) -> Result<(Vec<Parsed>, Vec<String>), CliError> {
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut i = 0;
    let canonical = |s: &OptSpec| -> String {
        s.long
            .map(str::to_string)
            .unwrap_or_else(|| s.short.expect("spec has a name").to_string())
    };
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            pos.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let spec = find_long(specs, name)?;
            let value = if spec.has_arg {
                match inline {
                    Some(v) => Some(v),
                    None => {
                        let v = args.get(i).cloned().ok_or_else(|| {
                            CliError::option(format!("option '--{name}' requires an argument"))
                        })?;
                        i += 1;
                        Some(v)
                    }
                }
            } else if inline.is_some() {
                return Err(CliError::option(format!(
                    "option '--{name}' doesn't allow an argument"
                )));
            } else {
                None
            };
            opts.push(Parsed {
                name: canonical(spec),
                value,
            });
        } else if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                let spec = specs
                    .iter()
                    .find(|s| s.short == Some(c))
                    .ok_or_else(|| CliError::option(format!("invalid option -- '{c}'")))?;
                let value = if spec.has_arg {
                    if j < chars.len() {
                        let v: String = chars[j..].iter().collect();
                        j = chars.len();
                        Some(v)
                    } else {
                        let v = args.get(i).cloned().ok_or_else(|| {
                            CliError::option(format!("option requires an argument -- '{c}'"))
                        })?;
                        i += 1;
                        Some(v)
                    }
                } else {
                    None
                };
                opts.push(Parsed {
                    name: canonical(spec),
                    value,
                });
            }
        } else {
            pos.push(a.clone());
        }
    }
    Ok((opts, pos))
}

/// Finds a long option by its full name or, as getopt_long does, by an unambiguous prefix.
fn find_long<'a>(specs: &'a [OptSpec], name: &str) -> Result<&'a OptSpec, CliError> {
    if let Some(s) = specs.iter().find(|s| s.long == Some(name)) {
        return Ok(s);
    }
    let matches: Vec<&OptSpec> = if name.is_empty() {
        Vec::new()
    } else {
        specs
            .iter()
            .filter(|s| s.long.is_some_and(|l| l.starts_with(name)))
            .collect()
    };
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(CliError::option(format!("unrecognized option '--{name}'"))),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|s| format!("'--{}'", s.long.unwrap_or_default()))
                .collect();
            Err(CliError::option(format!(
                "option '--{name}' is ambiguous; possibilities: {}",
                names.join(" ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn bundles_and_long_options() {
        let specs = [
            opt(Some('f'), None, true),
            opt(Some('p'), None, false),
            opt(Some('U'), Some("force-share"), false),
            opt(None, Some("output"), true),
        ];
        let (o, p) = parse(&s(&["-pU", "a", "-fqcow2", "--output=json", "b"]), &specs).unwrap();
        assert_eq!(p, s(&["a", "b"]));
        assert_eq!(o.len(), 4);
        assert_eq!(o[1].name, "force-share");
        assert_eq!(o[2].value.as_deref(), Some("qcow2"));
        assert_eq!(o[3].value.as_deref(), Some("json"));
        assert!(parse(&s(&["-x"]), &specs).is_err());
        assert!(parse(&s(&["-f"]), &specs).is_err());
        let (o, _) = parse(&s(&["--out", "json", "--force"]), &specs).unwrap();
        assert_eq!(o[0].name, "output");
        assert_eq!(o[1].name, "force-share");
        let e = parse(
            &s(&["--o", "x"]),
            &[opt(None, Some("on"), false), opt(None, Some("off"), false)],
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "option '--o' is ambiguous; possibilities: '--on' '--off'"
        );
    }
}
