//! Names that become paths: app names (control sockets, logs, cold-storage directories),
//! image names, snapshot ids, and the guest paths of writable directories. Each is checked
//! here, by one function, before any code joins it to a directory.

/// The longest app name.
pub const MAX_APP_NAME: usize = 64;
/// The longest guest path of a writable directory.
pub const MAX_GUEST_PATH: usize = 4096;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a plain app name.
    #[error(
        "app name {0:?} is not a plain name: 1 to 64 of A-Z, a-z, 0-9, '.', '_' and '-', \
         not starting with '.' or '-'"
    )]
    App(String),
    /// Not a plain image name.
    #[error("image name {0:?} is not a plain name: A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'")]
    Image(String),
    /// A guest directory that is not a plain absolute path.
    #[error("writable directory {0:?} is not a plain absolute path (no '.', '..' or NUL)")]
    GuestDir(String),
}

/// Whether `name` is 1 to `max` bytes of `[A-Za-z0-9._-]`, not starting with `.` (so it is
/// never `.`, `..` or a hidden scratch name) and holding no `/`.
pub fn is_plain(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks an app name before it becomes part of a path (`<run>/<name>.sock`,
/// `<logs>/<name>.log`, `<cold>/<name>/`) or an S3 key prefix.
pub fn validate_app_name(name: &str) -> Result<(), NameError> {
    if is_plain(name, MAX_APP_NAME) && !name.starts_with('-') {
        Ok(())
    } else {
        Err(NameError::App(name.to_string()))
    }
}

/// An app name made from `text` (such as a program's file name): characters a name may
/// not hold become `-`, and the result is cut to [`MAX_APP_NAME`]; `app` if nothing is
/// left.
pub fn app_name_from(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(['.', '-']);
    let name: String = trimmed.chars().take(MAX_APP_NAME).collect();
    if validate_app_name(&name).is_ok() {
        name
    } else {
        "app".to_string()
    }
}

/// Checks an image name (a directory of the image cache).
pub fn validate_image_name(name: &str) -> Result<(), NameError> {
    if is_plain(name, 255) {
        Ok(())
    } else {
        Err(NameError::Image(name.to_string()))
    }
}

/// Checks the guest path of a writable directory and returns it in one spelling: absolute,
/// no `.` or `..`, no empty parts, no trailing `/` (`/` itself for the root). Its host
/// directory is `<data dir>/<path without the leading />`, which must stay under the data
/// directory.
pub fn validate_guest_dir(path: &str) -> Result<String, NameError> {
    let bad = || NameError::GuestDir(path.to_string());
    if !path.starts_with('/') || path.len() > MAX_GUEST_PATH || path.contains('\0') {
        return Err(bad());
    }
    let parts: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
    if parts.iter().any(|part| *part == "." || *part == "..") {
        return Err(bad());
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_cannot_leave_their_directory() {
        for good in ["counter", "test-snap-1", "a.b_c", "X"] {
            assert_eq!(validate_app_name(good), Ok(()), "{good}");
        }
        let long = "x".repeat(MAX_APP_NAME + 1);
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "-rf", "a b", "a\0", &long,
        ] {
            assert!(validate_app_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(app_name_from("my prog"), "my-prog");
        assert_eq!(app_name_from("../../x"), "x");
        assert_eq!(app_name_from("..."), "app");
        assert_eq!(app_name_from(&long).len(), MAX_APP_NAME);
    }

    #[test]
    fn guest_dirs_are_plain_absolute_paths() {
        assert_eq!(validate_guest_dir("/tmp").unwrap(), "/tmp");
        assert_eq!(validate_guest_dir("//var//lib/").unwrap(), "/var/lib");
        assert_eq!(validate_guest_dir("/").unwrap(), "/");
        for bad in ["tmp", "/tmp/../etc", "/..", "/./x", "", "/a\0b"] {
            assert!(validate_guest_dir(bad).is_err(), "{bad:?}");
        }
        assert!(validate_image_name("python_3.11").is_ok());
        assert!(validate_image_name("../nginx").is_err());
    }
}
