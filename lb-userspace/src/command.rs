//! Running a helper program (iptables-restore, nft, ...) with optional stdin, its stderr
//! becoming the error.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

#[derive(Debug, thiserror::Error)]
#[error("running {program}: {message}")]
pub struct CommandError {
    pub program: String,
    pub message: String,
}

/// Runs `program args`, feeding `input` on stdin; returns stdout, or stderr as the error.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, CommandError> {
    let err = |message: String| CommandError {
        program: format!("{program} {}", args.join(" "))
            .trim_end()
            .to_string(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
