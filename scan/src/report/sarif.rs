//! The report as SARIF 2.1.0, for code-scanning dashboards: one result per model file that is not
//! approved (at the file, with the reasons) and per listening inference server.

use std::path::Path;

use serde_json::{Value, json};

use super::{Report, Standing};

/// The rules a result can name: (id, short description, level).
const RULES: &[(&str, &str, &str)] = &[
    (
        "sanctum/unapproved-model",
        "A model file that the approved-models lock does not list.",
        "warning",
    ),
    (
        "sanctum/tampered-model",
        "An approved model whose files differ from the lock, or a cached file whose content does not match its content-addressed name.",
        "error",
    ),
    (
        "sanctum/dangerous-model",
        "A model file that runs code when loaded (a pickle importing dangerous globals) or is disguised as another format.",
        "error",
    ),
    (
        "sanctum/inference-server",
        "A local inference server is listening.",
        "note",
    ),
];

/// The SARIF log of a report; `tool_version` is the scanner's version, `information_uri` its home.
pub fn log(report: &Report, tool_version: &str, information_uri: &str) -> Value {
    let rule = |id: &str| RULES.iter().position(|(r, ..)| *r == id).unwrap_or(0);
    let mut results = Vec::new();
    for file in &report.files {
        let id = match file.standing {
            Standing::Approved => continue,
            Standing::Unapproved => "sanctum/unapproved-model",
            Standing::Tampered => "sanctum/tampered-model",
            Standing::Dangerous => "sanctum/dangerous-model",
        };
        let index = rule(id);
        let reasons = if file.reasons.is_empty() {
            "not in the approved-models lock".to_string()
        } else {
            file.reasons.join("; ")
        };
        results.push(json!({
            "ruleId": id,
            "ruleIndex": index,
            "level": RULES[index].2,
            "message": {"text": format!("{} ({}): {reasons}", file.path.display(), file.standing.as_str())},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": file_uri(&file.path)}}}],
            "partialFingerprints": {"sha256": file.sha256},
        }));
    }
    for listener in report.listeners.iter().filter(|l| l.inference) {
        let index = rule("sanctum/inference-server");
        let who = listener
            .runner
            .clone()
            .or_else(|| listener.known_port.clone())
            .unwrap_or_default();
        let process = listener
            .process
            .as_ref()
            .map(|p| format!(" (pid {}, {})", p.pid, p.name))
            .unwrap_or_default();
        results.push(json!({
            "ruleId": "sanctum/inference-server",
            "ruleIndex": index,
            "level": RULES[index].2,
            "message": {"text": format!(
                "{who} listening on {}:{}{process}",
                listener.address, listener.port
            )},
        }));
    }
    let rules: Vec<Value> = RULES
        .iter()
        .map(|(id, text, level)| {
            json!({
                "id": id,
                "shortDescription": {"text": text},
                "defaultConfiguration": {"level": level},
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "sanctum",
                "version": tool_version,
                "informationUri": information_uri,
                "rules": rules,
            }},
            "results": results,
        }],
    })
}

/// A `file://` URI of an absolute path, percent-encoding everything but unreserved characters and `/`.
fn file_uri(path: &Path) -> String {
    let mut uri = String::from("file://");
    let text = path.to_string_lossy();
    if !text.starts_with('/') {
        uri.push('/');
    }
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                uri.push(byte as char)
            }
            _ => uri.push_str(&format!("%{byte:02X}")),
        }
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_encode_what_is_not_unreserved() {
        assert_eq!(
            file_uri(Path::new("/home/a b/m#1.bin")),
            "file:///home/a%20b/m%231.bin"
        );
    }
}
