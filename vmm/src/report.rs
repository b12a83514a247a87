//! How an error is told in one line: the error, then each of its sources.

/// `error` and every source below it, joined with ": " (a typed error's `Display` is only
/// its own step; the cause, such as the `std::io::Error` that says "No space left on
/// device", is its source).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("archiving /tmp/big")]
    struct Archiving(#[source] std::io::Error);

    #[test]
    fn the_cause_is_told_after_the_step() {
        let error = Archiving(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            error_chain(&error),
            "archiving /tmp/big: No space left on device (os error 28)"
        );
    }
}
