//! The report as a CycloneDX 1.6 BOM: one `machine-learning-model` component per model (its files as
//! `file` sub-components with their sha256, the lock's license and model card where approved) and
//! each listening socket as a `service`.

use serde_json::{Value, json};

use super::{Report, Standing};
use crate::listeners::Listener;
use crate::standing::format_name;

/// What a BOM says about where and when it was made, which the report itself does not hold.
#[derive(Debug, Clone)]
pub struct BomMeta {
    /// `urn:uuid:…`, unique per BOM.
    pub serial_number: String,
    /// RFC 3339 time of the scan.
    pub timestamp: String,
    /// The scanning tool's version.
    pub tool_version: String,
    /// The machine scanned.
    pub hostname: String,
}

/// A random-looking RFC 4122 version 4 UUID URN from 16 bytes the caller draws.
pub fn serial_number(bytes: [u8; 16]) -> String {
    let mut b = bytes;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex::encode(b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The BOM of a report.
pub fn bom(report: &Report, meta: &BomMeta) -> Value {
    let components: Vec<Value> = report
        .models
        .iter()
        .enumerate()
        .map(|(i, model)| {
            let files: Vec<Value> = model
                .files
                .iter()
                .filter_map(|&f| report.files.get(f).map(|file| (f, file)))
                .map(|(f, file)| {
                    json!({
                        "type": "file",
                        "bom-ref": format!("file-{f}"),
                        "name": file.path.display().to_string(),
                        "hashes": [{"alg": "SHA-256", "content": file.sha256}],
                        "properties": properties(&[
                            ("sanctum:standing", Some(file.standing.as_str().to_string())),
                            ("sanctum:format", Some(format_name(file.format).to_string())),
                            ("sanctum:size", Some(file.size.to_string())),
                            ("sanctum:reason", (!file.reasons.is_empty()).then(|| file.reasons.join("; "))),
                        ]),
                    })
                })
                .collect();
            let mut component = json!({
                "type": "machine-learning-model",
                "bom-ref": format!("model-{i}"),
                "name": model.name,
                "properties": properties(&[
                    ("sanctum:standing", Some(model.standing.as_str().to_string())),
                    ("sanctum:format", Some(format_name(model.format).to_string())),
                    ("sanctum:parameters", model.parameters.map(|p| p.to_string())),
                    ("sanctum:root", model.root.as_ref().map(|r| r.display().to_string())),
                ]),
                "components": files,
            });
            let task = model.approval.as_ref().map(|a| match a.task.as_str() {
                "chat" => "text-generation",
                "embed" => "feature-extraction",
                other => other,
            });
            let mut parameters = serde_json::Map::new();
            if let Some(task) = task {
                parameters.insert("task".into(), json!(task));
            }
            if let Some(architecture) = &model.architecture {
                parameters.insert("architectureFamily".into(), json!(architecture));
            }
            if !parameters.is_empty() {
                component["modelCard"] = json!({"modelParameters": parameters});
            }
            if let Some(approval) = &model.approval {
                component["version"] = json!(approval.digest);
                component["licenses"] = json!([{"expression": approval.license}]);
                component["hashes"] =
                    json!([{"alg": "SHA-256", "content": approval.digest}]);
                component["description"] = json!(match model.standing {
                    Standing::Approved => "approved model: every file matches the lock".to_string(),
                    _ => format!(
                        "approved model, {}: {}",
                        model.standing.as_str(),
                        model
                            .problems
                            .iter()
                            .map(|p| format!("{} {}", p.file, p.problem))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                });
            }
            component
        })
        .collect();
    let services: Vec<Value> = report
        .listeners
        .iter()
        .enumerate()
        .map(|(i, listener)| service(i, listener))
        .collect();
    json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": meta.serial_number,
        "version": 1,
        "metadata": {
            "timestamp": meta.timestamp,
            "tools": {"components": [{
                "type": "application",
                "name": "sanctum",
                "version": meta.tool_version,
            }]},
            "component": {"type": "device", "bom-ref": "device", "name": meta.hostname},
        },
        "components": components,
        "services": services,
    })
}

fn service(i: usize, listener: &Listener) -> Value {
    let host = match listener.address {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    };
    let name = listener
        .runner
        .clone()
        .or_else(|| listener.process.as_ref().map(|p| p.name.clone()))
        .unwrap_or_else(|| format!("{} listener", listener.protocol));
    json!({
        "bom-ref": format!("service-{i}"),
        "name": name,
        "endpoints": [format!("http://{host}:{}", listener.port)],
        "properties": properties(&[
            ("sanctum:inference", Some(listener.inference.to_string())),
            ("sanctum:known-port", listener.known_port.clone()),
            ("sanctum:pid", listener.process.as_ref().map(|p| p.pid.to_string())),
            ("sanctum:process", listener.process.as_ref().map(|p| p.argv.join(" "))),
        ]),
    })
}

fn properties(pairs: &[(&str, Option<String>)]) -> Value {
    Value::Array(
        pairs
            .iter()
            .filter_map(|(name, value)| {
                value
                    .as_ref()
                    .map(|value| json!({"name": name, "value": value}))
            })
            .collect(),
    )
}
