//! How an error is told in one line: the error, then each of its sources.

/// `error` and every source below it, joined with ": " (a typed error's `Display` is only
/// its own step; the cause, such as the `std::io::Error` that says "No space left on
/// device", is its source). A cause the line already ends with is not told twice: some
/// errors name their source in their own message too.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let told = cause.to_string();
        if !told.is_empty() && !line.ends_with(&told) {
            line.push_str(": ");
            line.push_str(&told);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("snapshot 7: {source}")]
    struct Naming {
        source: Archiving,
    }

    #[test]
    fn a_cause_the_message_already_names_is_told_once() {
        let error = Naming {
            source: Archiving(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        assert_eq!(
            error_chain(&error),
            "snapshot 7: archiving /tmp/big: No space left on device (os error 28)"
        );
    }

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
