//! `sanctum policy check`: the policy in force, every setting with its value and where it came
//! from (the file, or the default and what the default means), after the same checks every
//! command makes when it reads the policy.

use std::io::Write;
use std::process::ExitCode;

use attest::policy::{KeyRing, Policy};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{Value, json};

use super::Context;
use super::TableOrJson as Format;
use super::trust::PolicyFound;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Read the policy as every command does and print each setting, its value and its origin.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// How to print it.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// One setting as `policy check` prints it.
#[derive(Debug, Serialize)]
struct Setting {
    /// Its key in the policy file.
    key: &'static str,
    /// Its value in force.
    value: Value,
    /// `file`, or `default: ...` saying what the default does.
    from: String,
}

pub fn run(cmd: PolicyCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    let PolicyCommand::Check(args) = cmd;
    let (policy, found) = ctx.policy_found()?;
    let settings = settings(&policy);
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            let report = json!({
                "policy": policy.source,
                "found": found.map(PolicyFound::describe),
                "settings": settings,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        }
        Format::Table => {
            match (&policy.source, found) {
                (Some(path), Some(found)) => {
                    writeln!(out, "policy {} ({})", path.display(), found.describe())?
                }
                _ => writeln!(
                    out,
                    "no policy file (--policy, $SANCTUM_POLICY, sanctum-policy.toml at or above the \
                     current directory, $SANCTUM_HOME/policy.toml): the built-in defaults apply"
                )?,
            }
            let width = settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
            for setting in &settings {
                writeln!(
                    out,
                    "  {:width$}  {}  [{}]",
                    setting.key,
                    shown(&setting.value),
                    setting.from
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A value on one line: lists joined with commas, strings without quotes.
fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Array(items) if items.is_empty() => "(none)".to_owned(),
        Value::Array(items) => items.iter().map(shown).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// Every setting of the policy, in the file's order.
fn settings(policy: &Policy) -> Vec<Setting> {
    let in_file = policy.source.is_some();
    let from = |set: bool, default: &str| {
        if set && in_file {
            "file".to_owned()
        } else {
            format!("default: {default}")
        }
    };
    let keys = |ring: &KeyRing| -> Value {
        ring.iter()
            .map(|k| format!("{} ({})", k.name, k.key.hint().short()))
            .collect()
    };
    let signature_default = if policy.approvers.is_empty() {
        "false, no approver is named"
    } else {
        "true, because approvers are named"
    };
    let rules = &policy.rules;
    let option = |value: Option<Value>, default_value: Value, default: &str| {
        let set = value.is_some();
        (value.unwrap_or(default_value), from(set, default))
    };
    let list = |items: &Option<Vec<String>>| items.as_ref().map(|v| json!(v));
    let trust_settings: [(&'static str, (Value, String)); 5] = [
        (
            "approver",
            (
                keys(&policy.approvers),
                from(
                    !policy.approvers.is_empty(),
                    "none, no lock signature is trusted",
                ),
            ),
        ),
        (
            "signer",
            (
                keys(&policy.signers),
                from(
                    !policy.signers.is_empty(),
                    "none, no output attestation is trusted",
                ),
            ),
        ),
        (
            "licenses.allow",
            (
                json!(policy.licenses.allow),
                from(
                    !policy.licenses.allow.is_empty(),
                    "any license but non-commercial ones",
                ),
            ),
        ),
        (
            "licenses.deny",
            (
                json!(policy.licenses.deny),
                from(
                    !policy.licenses.deny.is_empty(),
                    "none beyond non-commercial",
                ),
            ),
        ),
        (
            "lock.require_signature",
            (
                json!(policy.require_lock_signature),
                from(policy.require_lock_signature_set, signature_default),
            ),
        ),
    ];
    let rule_settings: [(&'static str, (Value, String)); 8] = [
        (
            "sources.kinds",
            option(
                rules.sources.kinds.as_ref().map(|k| json!(k)),
                json!(["pypi", "hf", "oci", "hub"]),
                "every kind",
            ),
        ),
        (
            "sources.endpoints",
            option(list(&rules.sources.endpoints), json!("any"), "any endpoint"),
        ),
        (
            "sources.registries",
            option(
                list(&rules.sources.registries),
                json!("any"),
                "any registry",
            ),
        ),
        (
            "devices.allow",
            option(
                rules.devices.allow.as_ref().map(|d| json!(d)),
                json!(["cpu", "cuda", "metal"]),
                "every device this build has",
            ),
        ),
        (
            "formats.files",
            option(list(&rules.formats.files), json!("any"), "any format"),
        ),
        (
            "formats.weights",
            option(list(&rules.formats.weights), json!("any"), "any format"),
        ),
        (
            "outputs.require_git",
            option(
                rules.outputs.require_git.map(Value::Bool),
                json!(false),
                "outputs may be printed or written anywhere",
            ),
        ),
        (
            "audit.retention_days",
            option(
                rules.audit.retention_days.map(|d| json!(d)),
                Value::Null,
                "entries are kept for ever",
            ),
        ),
    ];
    trust_settings
        .into_iter()
        .chain(rule_settings)
        .map(|(key, (value, from))| Setting { key, value, from })
        .collect()
}
