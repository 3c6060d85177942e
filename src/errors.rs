//! How an error is said to a person: once, with each of its causes once.
//!
//! The library's errors say their cause in their own message ("cannot open the state store at
//! …: IO error: …") and also return it from `source()`, so that callers can inspect it. Printing
//! the chain (anyhow's `{:#}`) would then say every such cause twice ("X: X"). [`describe`]
//! adds a cause only when the text so far does not already say it.

use std::error::Error;

/// `e` and the causes its message does not already include, joined by `: `.
pub fn describe(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store: {source} — fix it")]
    struct Says {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store")]
    struct Hides {
        source: std::io::Error,
    }

    fn io() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotADirectory, "Not a directory")
    }

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let e = anyhow::Error::from(Says { source: io() }).context("status");
        assert_eq!(
            describe(e.as_ref()),
            "status: cannot open the store: Not a directory — fix it"
        );
        assert_eq!(
            format!("{e:#}"),
            "status: cannot open the store: Not a directory — fix it: Not a directory",
            "what anyhow prints"
        );
    }

    #[test]
    fn a_cause_not_said_is_added() {
        let e = anyhow::Error::from(Hides { source: io() });
        assert_eq!(
            describe(e.as_ref()),
            "cannot open the store: Not a directory"
        );
    }
}
