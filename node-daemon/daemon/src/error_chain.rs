//! How the daemon writes an error into a log line, a status message or a
//! reply: the error with all its sources, `a: b: c`.

/// An error with its sources, `a: b: c`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
