//! What a named job's name may be (`farm build --job NAME`, `SubmitRequest.job`,
//! `GET /badge/NAME.svg`): one rule, checked by the CLI before it evaluates
//! anything and by the coordinator before it records anything.
//!
//! A name is 1 to [`MAX_JOB_NAME`] characters of `A-Z a-z 0-9 . _ - / : + @`,
//! starts with a letter or digit, and is made of `/`-separated segments none
//! of which is empty, `.` or `..` (so `ci/app` and `nixpkgs:hello@x86_64-linux`
//! are names; `/x`, `a//b`, `a/` and `a/../b` are not). The name goes into a
//! URL path as it is, so a browser or proxy that normalises paths can never
//! turn one job's badge URL into another's.

/// The longest job name, in characters (all ASCII).
pub const MAX_JOB_NAME: usize = 128;

/// Why a string is not a job name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobNameError {
    #[error("the job name is empty")]
    Empty,
    #[error("the job name is {0} characters long; at most {MAX_JOB_NAME} are allowed")]
    TooLong(usize),
    #[error("the job name {name:?} contains {ch:?}; allowed are letters, digits and . _ - / : + @")]
    BadChar { name: String, ch: char },
    #[error("the job name {0:?} must start with a letter or a digit")]
    BadStart(String),
    #[error(
        "the job name {0:?} has an empty, \".\" or \"..\" segment between slashes (or ends in a slash)"
    )]
    BadSegment(String),
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '+' | '@')
}

/// Check `name` against the rule above.
pub fn check_job_name(name: &str) -> Result<(), JobNameError> {
    if name.is_empty() {
        return Err(JobNameError::Empty);
    }
    let n = name.chars().count();
    if n > MAX_JOB_NAME {
        return Err(JobNameError::TooLong(n));
    }
    // Quoted in the error with escapes: a hostile name cannot move a terminal.
    if let Some(ch) = name.chars().find(|c| !allowed(*c)) {
        return Err(JobNameError::BadChar {
            name: name.to_owned(),
            ch,
        });
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(JobNameError::BadStart(name.to_owned()));
    }
    if name
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(JobNameError::BadSegment(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "ci/app",
            "nixpkgs:hello@x86_64-linux",
            "checks.x86_64-linux.fmt",
            "v1.2+build",
            "a/b/c",
            "a..b",
            &"x".repeat(MAX_JOB_NAME),
        ] {
            assert_eq!(check_job_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_job_name(""), Err(JobNameError::Empty));
        assert!(matches!(
            check_job_name(&"x".repeat(MAX_JOB_NAME + 1)),
            Err(JobNameError::TooLong(129))
        ));
        for bad in [
            "a b", "a<b", "a\"b", "ä", "a\nb", "a%2Fb", "a?b", "a#b", "a\\b",
        ] {
            assert!(
                matches!(check_job_name(bad), Err(JobNameError::BadChar { .. })),
                "{bad}"
            );
        }
        for bad in ["/a", ".a", "-a", "_a", "@a"] {
            assert!(
                matches!(check_job_name(bad), Err(JobNameError::BadStart(_))),
                "{bad}"
            );
        }
        for bad in ["a/", "a//b", "a/./b", "a/../b", "a/.."] {
            assert!(
                matches!(check_job_name(bad), Err(JobNameError::BadSegment(_))),
                "{bad}"
            );
        }
        let e = check_job_name("ci app").unwrap_err().to_string();
        assert!(e.contains("\"ci app\"") && e.contains("' '"), "{e}");
    }
}
