//! What the CLI tests share.

/// The command line `command`, then each `(flag, value)` of `defaults` whose flag `extra`
/// does not name, then `extra`: flags in `extra` replace the defaults' values.
pub fn with_defaults(command: &[&str], defaults: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
    for (flag, value) in defaults {
        if !extra.contains(flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
