//! Guest failures met by the engine: messages cut to size, and the line in
//! a module's chunk where guest code raised.

use std::collections::HashMap;

use super::prepare::PreparedModule;
use crate::error::{Error, ReloadStep};

/// The first line of `s`.
pub(super) fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The chunk name module `name`'s code in this reload was loaded under.
pub(super) fn chunk_of(name: &str, by_name: &HashMap<&str, &PreparedModule>) -> String {
    match by_name.get(name) {
        Some(p) if !p.file.is_empty() => p.file.clone(),
        _ => name.to_owned(),
    }
}

/// A Luau error raised while the engine ran guest code: its message without
/// mlua's wrapping and traceback (cut to [`MAX_GUEST_MESSAGE_BYTES`]), and
/// the line in `chunk` where it was raised (from the message's position,
/// else from the traceback's frames).
pub(super) fn failure_in(e: &mlua::Error, chunk: &str) -> (String, Option<u32>) {
    let text = match e {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { cause, .. } => cause.to_string(),
        other => other.to_string(),
    };
    let (message, traceback) = text
        .split_once("\nstack traceback:")
        .unwrap_or((text.as_str(), ""));
    (guest_text(message), line_in(chunk, message, traceback))
}

/// Bytes of a guest's error text kept in a `reload_aborted` message.
const MAX_GUEST_MESSAGE_BYTES: usize = 4096;

/// A guest's error text, cut to [`MAX_GUEST_MESSAGE_BYTES`] with
/// `… (N more bytes)`: a guest can raise megabytes.
pub(super) fn guest_text(text: &str) -> String {
    if text.len() <= MAX_GUEST_MESSAGE_BYTES {
        return text.to_owned();
    }
    let mut cut = MAX_GUEST_MESSAGE_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes)", &text[..cut], text.len() - cut)
}

/// The line in `chunk` of an error with this message and traceback.
pub(super) fn line_in(chunk: &str, message: &str, traceback: &str) -> Option<u32> {
    let at_message = crate::diagnostic::error_position(message);
    let frames = crate::diagnostic::guest_frames(traceback)
        .into_iter()
        .filter_map(crate::diagnostic::frame_position);
    at_message
        .into_iter()
        .chain(frames)
        .find(|(c, _)| *c == chunk)
        .map(|(_, line)| line)
}

/// A `reload_aborted` error of `step` about `module`.
pub(super) fn aborted(
    step: ReloadStep,
    module: Option<&str>,
    line: Option<u32>,
    message: String,
) -> Error {
    Error::ReloadAborted {
        step,
        module: module.map(str::to_owned),
        process: None,
        line,
        column: None,
        message,
    }
}
