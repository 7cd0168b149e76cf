//! The trust policy: which keys approve locks and models, which keys may stamp outputs, which licenses
//! are acceptable, and whether an unsigned lock may be used.
//!
//! ```toml
//! version = 1
//!
//! [[approver]]                 # signs models.lock and model directories
//! name = "security-team"
//! key = "keys/security.pub"    # PEM public key, relative to this file; or inline: pem = """-----BEGIN..."""
//!
//! [[signer]]                   # stamps outputs (a developer machine, a CI runner)
//! name = "ci"
//! key = "keys/ci.pub"
//!
//! [licenses]
//! allow = ["Apache-2.0", "MIT"] # when given, only these (SPDX ids)
//! deny = ["GPL-3.0-only"]       # always refused; non-commercial (-NC-) licenses are refused unless allowed
//!
//! [lock]
//! require_signature = true     # default: true when an approver is named
//! ```
//!
//! and the rules of what may run, from where and on what ([`rules`]: `[sources]`, `[devices]`,
//! `[formats]`, `[outputs]`, `[audit]`).
//!
//! Decisions are built from two small combinators, [`all_of`] and [`any_of`] (and the [`Rule`] types
//! [`AllOf`], [`AnyOf`] over them), so that an SPDX expression such as `MIT OR CC-BY-NC-4.0` is judged
//! as "any of its alternatives is allowed".

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::keys::{KeyError, KeyHint, PublicKey};

pub mod rules;

pub use rules::{Rules, Violation};

/// Largest policy file read: a policy is a page of settings, never megabytes.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// The policy file format version this build reads.
pub const POLICY_VERSION: u32 = 1;

/// A rule said no, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// The outcome of a rule.
pub type Decision = Result<(), Denied>;

/// Allowed when every decision allows; the first denial otherwise. Nothing to decide allows.
/// Stops at the first denial.
pub fn all_of(decisions: impl IntoIterator<Item = Decision>) -> Decision {
    for decision in decisions {
        decision?;
    }
    Ok(())
}

/// Allowed when at least one decision allows; otherwise denied with every reason. Nothing to decide
/// denies (no alternative allowed it). Stops at the first allow.
pub fn any_of(decisions: impl IntoIterator<Item = Decision>) -> Decision {
    let mut reasons = Vec::new();
    for decision in decisions {
        match decision {
            Ok(()) => return Ok(()),
            Err(Denied(why)) => reasons.push(why),
        }
    }
    if reasons.is_empty() {
        Err(Denied("no alternative to allow it".into()))
    } else {
        Err(Denied(reasons.join("; and ")))
    }
}

/// A check of a `T`.
pub trait Rule<T: ?Sized> {
    /// Allows or denies `input`.
    fn check(&self, input: &T) -> Decision;
}

impl<T: ?Sized, F: Fn(&T) -> Decision> Rule<T> for F {
    fn check(&self, input: &T) -> Decision {
        self(input)
    }
}

/// Every rule must allow ([`all_of`]).
pub struct AllOf<'a, T: ?Sized>(pub Vec<Box<dyn Rule<T> + 'a>>);

/// At least one rule must allow ([`any_of`]).
pub struct AnyOf<'a, T: ?Sized>(pub Vec<Box<dyn Rule<T> + 'a>>);

impl<T: ?Sized> Rule<T> for AllOf<'_, T> {
    fn check(&self, input: &T) -> Decision {
        all_of(self.0.iter().map(|r| r.check(input)))
    }
}

impl<T: ?Sized> Rule<T> for AnyOf<'_, T> {
    fn check(&self, input: &T) -> Decision {
        any_of(self.0.iter().map(|r| r.check(input)))
    }
}

/// A key the policy trusts, with the name it gives it.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// The policy's name for the key (`security-team`, `ci`...).
    pub name: String,
    /// The key.
    pub key: PublicKey,
}

/// Trusted keys, found by hint.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Vec<TrustedKey>,
}

impl KeyRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key (a key already present keeps its first name).
    pub fn add(&mut self, name: impl Into<String>, key: PublicKey) {
        if self.get(key.hint()).is_none() {
            self.keys.push(TrustedKey {
                name: name.into(),
                key,
            });
        }
    }

    /// The trusted key with this hint.
    pub fn get(&self, hint: &KeyHint) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key.hint() == hint)
    }

    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys, in the order added.
    pub fn iter(&self) -> impl Iterator<Item = &TrustedKey> {
        self.keys.iter()
    }

    /// A rule allowing exactly the keys of this ring ([`any_of`] over "is this key").
    pub fn check(&self, hint: &KeyHint) -> Decision {
        any_of(self.keys.iter().map(|k| {
            if k.key.hint() == hint {
                Ok(())
            } else {
                Err(Denied(format!("not {}", k.name)))
            }
        }))
        .map_err(|_| Denied(format!("key {} is not trusted", hint.short())))
    }
}

/// Which licenses are acceptable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicensePolicy {
    /// When non-empty, only these SPDX ids are allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Always refused.
    #[serde(default)]
    pub deny: Vec<String>,
}

impl LicensePolicy {
    /// Judges one SPDX license id.
    pub fn check_id(&self, id: &str) -> Decision {
        let listed = |list: &[String]| list.iter().any(|l| l.eq_ignore_ascii_case(id));
        if listed(&self.deny) {
            return Err(Denied(format!("{id} is denied by the policy")));
        }
        if listed(&self.allow) {
            return Ok(());
        }
        if !self.allow.is_empty() {
            return Err(Denied(format!(
                "{id} is not among the policy's allowed licenses ({})",
                self.allow.join(", ")
            )));
        }
        if is_non_commercial(id) {
            return Err(Denied(format!(
                "{id} is a non-commercial license, denied unless the policy's licenses.allow names it"
            )));
        }
        Ok(())
    }

    /// Judges an SPDX license expression: `A OR B` is allowed when either is, `A AND B` when both are,
    /// `A WITH exception` as `A`.
    pub fn check(&self, expression: &str) -> Decision {
        let expr = LicenseExpr::parse(expression).map_err(|e| {
            Denied(format!(
                "license {expression:?} is not an SPDX expression: {e}"
            ))
        })?;
        self.check_expr(&expr)
    }

    fn check_expr(&self, expr: &LicenseExpr) -> Decision {
        match expr {
            LicenseExpr::Id(id) => self.check_id(id),
            LicenseExpr::And(parts) => all_of(parts.iter().map(|p| self.check_expr(p))),
            LicenseExpr::Or(parts) => any_of(parts.iter().map(|p| self.check_expr(p))),
        }
    }
}

/// True for Creative Commons non-commercial licenses (an `NC` component: `CC-BY-NC-4.0`,
/// `CC-BY-NC-SA-4.0`, `CC-BY-NC-ND-3.0`...).
pub fn is_non_commercial(id: &str) -> bool {
    id.split('-').any(|part| part.eq_ignore_ascii_case("NC"))
}

/// A parsed SPDX license expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicenseExpr {
    /// A license id (a `WITH` exception dropped: it only adds permissions).
    Id(String),
    /// All of these.
    And(Vec<LicenseExpr>),
    /// Any of these.
    Or(Vec<LicenseExpr>),
}

impl LicenseExpr {
    /// Parses `id`, `a AND b`, `a OR b`, `a WITH exc` and parentheses (operators in upper or lower case).
    pub fn parse(text: &str) -> Result<Self, String> {
        let spaced = text.replace('(', " ( ").replace(')', " ) ");
        let tokens: Vec<&str> = spaced.split_whitespace().collect();
        let mut pos = 0;
        let expr = parse_or(&tokens, &mut pos)?;
        if pos != tokens.len() {
            return Err(format!("unexpected {:?}", tokens[pos]));
        }
        Ok(expr)
    }
}

fn is_op(token: &str, op: &str) -> bool {
    token == op || token == op.to_ascii_lowercase()
}

fn parse_or(tokens: &[&str], pos: &mut usize) -> Result<LicenseExpr, String> {
    let mut parts = vec![parse_and(tokens, pos)?];
    while tokens.get(*pos).is_some_and(|t| is_op(t, "OR")) {
        *pos += 1;
        parts.push(parse_and(tokens, pos)?);
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        LicenseExpr::Or(parts)
    })
}

fn parse_and(tokens: &[&str], pos: &mut usize) -> Result<LicenseExpr, String> {
    let mut parts = vec![parse_atom(tokens, pos)?];
    while tokens.get(*pos).is_some_and(|t| is_op(t, "AND")) {
        *pos += 1;
        parts.push(parse_atom(tokens, pos)?);
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        LicenseExpr::And(parts)
    })
}

fn parse_atom(tokens: &[&str], pos: &mut usize) -> Result<LicenseExpr, String> {
    let token = *tokens.get(*pos).ok_or("unexpected end")?;
    *pos += 1;
    if token == "(" {
        let inner = parse_or(tokens, pos)?;
        if tokens.get(*pos) != Some(&")") {
            return Err("missing ')'".into());
        }
        *pos += 1;
        return Ok(inner);
    }
    let valid_id = token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.+:".contains(c));
    if !valid_id || ["AND", "OR", "WITH", ")"].iter().any(|op| is_op(token, op)) {
        return Err(format!("unexpected {token:?}"));
    }
    if tokens.get(*pos).is_some_and(|t| is_op(t, "WITH")) {
        *pos += 1;
        tokens.get(*pos).ok_or("missing exception after WITH")?;
        *pos += 1;
    }
    Ok(LicenseExpr::Id(token.to_owned()))
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not valid TOML, or unknown or mistyped fields.
    #[error("not a valid policy: {0}")]
    Syntax(#[from] toml::de::Error),
    /// Another version.
    #[error("unsupported policy version {0} (this sanctum reads version {POLICY_VERSION})")]
    Version(u32),
    /// A key entry with neither or both of `key` and `pem`.
    #[error("{role} {name:?}: give exactly one of `key` (a file) and `pem`")]
    KeySource {
        /// `approver` or `signer`.
        role: &'static str,
        /// The entry's name.
        name: String,
    },
    /// A key file that cannot be read.
    #[error("{role} {name:?}: cannot read key file {path}: {error}")]
    KeyFile {
        /// `approver` or `signer`.
        role: &'static str,
        /// The entry's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// A key that is not a supported public key.
    #[error("{role} {name:?}: {error}")]
    Key {
        /// `approver` or `signer`.
        role: &'static str,
        /// The entry's name.
        name: String,
        /// The cause.
        error: KeyError,
    },
    /// An entry in the license lists that is not an SPDX id.
    #[error("licenses: {0:?} is not an SPDX license id")]
    License(String),
    /// A rule of what may run that cannot be right.
    #[error(transparent)]
    Rule(#[from] rules::InvalidRule),
    /// `require_signature = true` with no approver to sign.
    #[error("lock.require_signature is true but no [[approver]] is named: no lock could ever pass")]
    NoApprovers,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    #[serde(default)]
    approver: Vec<KeyEntry>,
    #[serde(default)]
    signer: Vec<KeyEntry>,
    #[serde(default)]
    licenses: LicensePolicy,
    #[serde(default)]
    lock: LockRules,
    #[serde(default)]
    sources: rules::SourceRules,
    #[serde(default)]
    devices: rules::DeviceRules,
    #[serde(default)]
    formats: rules::FormatRules,
    #[serde(default)]
    outputs: rules::OutputRules,
    #[serde(default)]
    audit: rules::AuditRules,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    key: Option<PathBuf>,
    pem: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockRules {
    require_signature: Option<bool>,
}

/// A checked policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keys that sign `models.lock` and model directories.
    pub approvers: KeyRing,
    /// Keys that stamp outputs.
    pub signers: KeyRing,
    /// Acceptable licenses.
    pub licenses: LicensePolicy,
    /// Whether the lock must carry a valid signature by an approver.
    pub require_lock_signature: bool,
    /// Whether `require_lock_signature` was set in the file (else it follows from the approvers).
    pub require_lock_signature_set: bool,
    /// What may run, from where and on what.
    pub rules: Rules,
    /// The file it was read from; `None` for the built-in default.
    pub source: Option<PathBuf>,
}

impl Policy {
    /// The policy when no file is found: no trusted keys, an unsigned lock allowed, non-commercial
    /// licenses denied.
    pub fn builtin() -> Self {
        Self::default()
    }

    /// Reads a policy file; key files are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, PolicyLoadError> {
        let read_error = |error| PolicyLoadError::Read {
            path: path.to_owned(),
            error,
        };
        let text = crate::files::read_bounded_text(path, MAX_POLICY_BYTES).map_err(read_error)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut policy =
            Self::from_toml(&text, base).map_err(|error| PolicyLoadError::Invalid {
                path: path.to_owned(),
                error,
            })?;
        policy.source = Some(path.to_owned());
        policy.rules.policy = Some(path.to_owned());
        Ok(policy)
    }

    /// Parses policy TOML; relative key paths are joined to `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text)?;
        if file.version != POLICY_VERSION {
            return Err(PolicyError::Version(file.version));
        }
        let ring = |role: &'static str, entries: Vec<KeyEntry>| -> Result<KeyRing, PolicyError> {
            let mut ring = KeyRing::new();
            for entry in entries {
                let pem = match (entry.key, entry.pem) {
                    (Some(path), None) => {
                        let path = base_dir.join(path);
                        crate::files::read_bounded(&path, crate::files::MAX_DOCUMENT_BYTES)
                            .map_err(|error| PolicyError::KeyFile {
                                role,
                                name: entry.name.clone(),
                                path,
                                error,
                            })?
                    }
                    (None, Some(pem)) => pem.into_bytes(),
                    _ => {
                        return Err(PolicyError::KeySource {
                            role,
                            name: entry.name,
                        });
                    }
                };
                let key = PublicKey::from_pem(&pem).map_err(|error| PolicyError::Key {
                    role,
                    name: entry.name.clone(),
                    error,
                })?;
                ring.add(entry.name, key);
            }
            Ok(ring)
        };
        let approvers = ring("approver", file.approver)?;
        let signers = ring("signer", file.signer)?;
        for id in file.licenses.allow.iter().chain(&file.licenses.deny) {
            if !matches!(LicenseExpr::parse(id), Ok(LicenseExpr::Id(_))) {
                return Err(PolicyError::License(id.clone()));
            }
        }
        let require_lock_signature = file.lock.require_signature.unwrap_or(!approvers.is_empty());
        if require_lock_signature && approvers.is_empty() {
            return Err(PolicyError::NoApprovers);
        }
        let rules = Rules {
            sources: file.sources,
            devices: file.devices,
            formats: file.formats,
            outputs: file.outputs,
            audit: file.audit,
            policy: None,
        };
        rules.validate()?;
        Ok(Self {
            approvers,
            signers,
            licenses: file.licenses,
            require_lock_signature,
            require_lock_signature_set: file.lock.require_signature.is_some(),
            rules,
            source: None,
        })
    }
}

/// A policy file that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyLoadError {
    /// Reading failed.
    #[error("cannot read policy {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// The content is wrong.
    #[error("policy {path}: {error}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: PolicyError,
    },
}

impl fmt::Display for LicenseExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |f: &mut fmt::Formatter<'_>, parts: &[LicenseExpr], op: &str| {
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    write!(f, " {op} ")?;
                }
                match p {
                    LicenseExpr::Id(id) => f.write_str(id)?,
                    other => write!(f, "({other})")?,
                }
            }
            Ok(())
        };
        match self {
            LicenseExpr::Id(id) => f.write_str(id),
            LicenseExpr::And(parts) => join(f, parts, "AND"),
            LicenseExpr::Or(parts) => join(f, parts, "OR"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn decision(allow: bool) -> Decision {
        if allow {
            Ok(())
        } else {
            Err(Denied("no".into()))
        }
    }

    /// Every combination of 0 to 4 inputs: all_of is logical AND, any_of is logical OR (the empty any_of
    /// denies, the empty all_of allows).
    #[test]
    fn combinators_truth_tables() {
        for n in 0..=4u32 {
            for bits in 0..(1u32 << n) {
                let inputs: Vec<bool> = (0..n).map(|i| bits & (1 << i) != 0).collect();
                let all = all_of(inputs.iter().map(|&b| decision(b)));
                let any = any_of(inputs.iter().map(|&b| decision(b)));
                assert_eq!(all.is_ok(), inputs.iter().all(|&b| b), "all_of {inputs:?}");
                assert_eq!(any.is_ok(), inputs.iter().any(|&b| b), "any_of {inputs:?}");

                let rules = |inputs: &[bool]| -> Vec<Box<dyn Rule<()>>> {
                    inputs
                        .iter()
                        .map(|&b| Box::new(move |_: &()| decision(b)) as Box<dyn Rule<()>>)
                        .collect()
                };
                assert_eq!(
                    AllOf(rules(&inputs)).check(&()).is_ok(),
                    inputs.iter().all(|&b| b)
                );
                assert_eq!(
                    AnyOf(rules(&inputs)).check(&()).is_ok(),
                    inputs.iter().any(|&b| b)
                );
            }
        }
    }

    #[test]
    fn combinators_nest_and_short_circuit() {
        let calls = std::cell::Cell::new(0);
        let counted = |b: bool| {
            calls.set(calls.get() + 1);
            decision(b)
        };
        assert!(any_of([true, false, false].map(&counted)).is_ok());
        calls.set(0);
        assert!(any_of([true, false].into_iter().map(&counted)).is_ok());
        assert_eq!(calls.get(), 1, "any_of stops at the first allow");
        calls.set(0);
        assert!(all_of([false, true].into_iter().map(&counted)).is_err());
        assert_eq!(calls.get(), 1, "all_of stops at the first denial");
        // (a OR b) AND (c OR d) for a table of inputs.
        for bits in 0..16u32 {
            let b = |i: u32| bits & (1 << i) != 0;
            let got = all_of([
                any_of([decision(b(0)), decision(b(1))]),
                any_of([decision(b(2)), decision(b(3))]),
            ]);
            assert_eq!(got.is_ok(), (b(0) || b(1)) && (b(2) || b(3)), "{bits:04b}");
        }
        assert_eq!(
            any_of([Err(Denied("x".into())), Err(Denied("y".into()))])
                .unwrap_err()
                .0,
            "x; and y"
        );
    }

    #[test]
    fn license_expressions_parse() {
        use LicenseExpr::*;
        let id = |s: &str| Id(s.into());
        assert_eq!(LicenseExpr::parse("MIT").unwrap(), id("MIT"));
        assert_eq!(
            LicenseExpr::parse("MIT OR Apache-2.0 AND BSD-3-Clause").unwrap(),
            Or(vec![
                id("MIT"),
                And(vec![id("Apache-2.0"), id("BSD-3-Clause")])
            ])
        );
        assert_eq!(
            LicenseExpr::parse(
                "(MIT or CC-BY-NC-4.0) and GPL-2.0-only WITH Classpath-exception-2.0"
            )
            .unwrap(),
            And(vec![
                Or(vec![id("MIT"), id("CC-BY-NC-4.0")]),
                id("GPL-2.0-only")
            ])
        );
        for bad in [
            "", "MIT OR", "(MIT", "MIT)", "AND", "MIT WITH", "a b", "M!T",
        ] {
            assert!(LicenseExpr::parse(bad).is_err(), "{bad:?}");
        }
        let e = LicenseExpr::parse("(MIT OR X) AND Y").unwrap();
        assert_eq!(e.to_string(), "(MIT OR X) AND Y");
    }

    #[test]
    fn license_policy_truth_table() {
        let open = LicensePolicy::default();
        let allow_nc = LicensePolicy {
            allow: vec![],
            deny: vec![],
        };
        let strict = LicensePolicy {
            allow: vec!["Apache-2.0".into(), "MIT".into(), "CC-BY-NC-4.0".into()],
            deny: vec!["MIT".into()],
        };
        let deny_gpl = LicensePolicy {
            allow: vec![],
            deny: vec!["GPL-3.0-only".into()],
        };
        // (policy, expression, allowed)
        let table: &[(&LicensePolicy, &str, bool)] = &[
            (&open, "Apache-2.0", true),
            (&open, "CC-BY-NC-4.0", false),
            (&open, "CC-BY-NC-SA-4.0", false),
            (&open, "cc-by-nc-nd-3.0", false),
            (&open, "CC-BY-4.0", true),
            (&open, "MIT OR CC-BY-NC-4.0", true),
            (&open, "MIT AND CC-BY-NC-4.0", false),
            (&allow_nc, "Apache-2.0", true),
            (&strict, "Apache-2.0", true),
            (&strict, "apache-2.0", true),
            (&strict, "CC-BY-NC-4.0", true),
            (&strict, "MIT", false),
            (&strict, "BSD-3-Clause", false),
            (&strict, "MIT OR Apache-2.0", true),
            (&strict, "MIT AND Apache-2.0", false),
            (&deny_gpl, "GPL-3.0-only", false),
            (&deny_gpl, "GPL-3.0-only OR MIT", true),
            (&deny_gpl, "not an expression (", false),
        ];
        for (policy, expr, allowed) in table {
            assert_eq!(
                policy.check(expr).is_ok(),
                *allowed,
                "{expr} under {policy:?}"
            );
        }
        assert!(
            open.check("CC-BY-NC-4.0")
                .unwrap_err()
                .0
                .contains("non-commercial"),
            "the reason names the rule"
        );
    }

    #[test]
    fn policy_file_parses_keys_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let approver = SigningKey::generate().unwrap();
        let signer = SigningKey::generate().unwrap();
        std::fs::write(dir.path().join("a.pub"), approver.public().to_pem()).unwrap();
        let text = format!(
            "version = 1\n[[approver]]\nname = \"sec\"\nkey = \"a.pub\"\n[[signer]]\nname = \"ci\"\npem = \"\"\"\n{}\"\"\"\n[licenses]\ndeny = [\"GPL-3.0-only\"]\n",
            signer.public().to_pem()
        );
        let policy = Policy::from_toml(&text, dir.path()).unwrap();
        assert!(
            policy.require_lock_signature,
            "an approver makes the signature required"
        );
        assert_eq!(policy.approvers.get(approver.hint()).unwrap().name, "sec");
        assert_eq!(policy.signers.get(signer.hint()).unwrap().name, "ci");
        assert!(policy.signers.get(approver.hint()).is_none());
        assert!(policy.signers.check(signer.hint()).is_ok());
        assert!(policy.signers.check(approver.hint()).is_err());

        let builtin = Policy::builtin();
        assert!(!builtin.require_lock_signature && builtin.signers.is_empty());

        for (bad, want) in [
            ("version = 2", "unsupported policy version"),
            (
                "version = 1\n[lock]\nrequire_signature = true",
                "no [[approver]]",
            ),
            ("version = 1\n[[signer]]\nname = \"x\"", "exactly one of"),
            (
                "version = 1\n[[signer]]\nname = \"x\"\nkey = \"missing.pub\"",
                "cannot read key file",
            ),
            (
                "version = 1\n[[signer]]\nname = \"x\"\npem = \"junk\"",
                "not a key file",
            ),
            (
                "version = 1\n[licenses]\nallow = [\"MIT OR X\"]",
                "not an SPDX license id",
            ),
            ("version = 1\nunknown = 1", "unknown field"),
        ] {
            let err = Policy::from_toml(bad, dir.path()).unwrap_err().to_string();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }
}
