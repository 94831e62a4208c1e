//! Compile and check: the one path from source text to bytecode the engine
//! loads (reloads, sandbox creation, `eval`, imported histories, state
//! handlers all come through here).
//!
//! Invariants:
//! * Pure: no VM is involved, so it runs on the caller's thread and a huge
//!   source never stalls the sandbox.
//! * Every module of a request is compiled and checked; all problems are
//!   reported, first module first, within the bounds of
//!   [`crate::diagnostic`]: at most 20 per module, 56 KiB in all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::analysis::{self, FindingKind};
use super::history::ModuleVersion;
use crate::diagnostic::Report;
use crate::error::{Error, Result};

/// A compiled and checked source, ready for the engine's apply step.
#[derive(Clone, Debug)]
pub struct PreparedModule {
    /// Module name.
    pub name: String,
    /// File name used in diagnostics.
    pub file: String,
    /// The source.
    pub source: String,
    /// SHA-256, hex.
    pub checksum: String,
    /// Our bytecode.
    pub bytecode: Arc<Vec<u8>>,
    /// `require`d modules.
    pub dependencies: Vec<String>,
    /// Microseconds spent compiling and checking.
    pub compile_us: u64,
}

/// What compile/check needs to know about the target sandbox.
pub struct PrepareContext<'a> {
    /// Globals a module may read.
    pub known_globals: &'a [String],
    /// `limits.max_source_bytes`.
    pub max_source_bytes: usize,
    /// Module name → file for diagnostics (default `<name>.luau`).
    pub files: &'a BTreeMap<String, PathBuf>,
}

/// Compiles and checks sources (SPEC §3 steps 1–2, the part that needs no VM).
/// All problems of all modules are reported, first module first, within the
/// bounds of [`crate::diagnostic`]: at most 20 per module, 56 KiB in all.
pub fn prepare(
    sources: &BTreeMap<String, String>,
    cx: &PrepareContext<'_>,
) -> Result<Vec<PreparedModule>> {
    let known: HashSet<&str> = cx.known_globals.iter().map(String::as_str).collect();
    let is_known = |g: &str| known.contains(g);
    let mut out = Vec::new();
    let mut report = Report::default();
    for (name, source) in sources {
        crate::config::validate_module_name(name)?;
        let started = Instant::now();
        let file = module_file(name, cx.files);
        let mut problems = report.module(name, &file, source);
        let bytecode = match compile_source(name, &file, source, cx.max_source_bytes) {
            Ok(b) => b,
            Err(Error::Compile { diagnostics }) => {
                for d in diagnostics {
                    problems.push_diagnostic(d);
                }
                problems.finish();
                continue;
            }
            Err(e) => return Err(e),
        };
        let analysis = analysis::analyze(source, &is_known)?;
        for f in &analysis.findings {
            problems.push(finding_kind(&f.kind), f.line, f.column, &f.message);
        }
        problems.count_more(analysis.more);
        problems.finish();
        out.push(PreparedModule {
            name: name.clone(),
            file,
            checksum: checksum(source),
            source: source.clone(),
            bytecode,
            dependencies: analysis.requires.iter().map(|r| r.module.clone()).collect(),
            compile_us: started.elapsed().as_micros() as u64,
        });
    }
    if report.is_empty() {
        Ok(out)
    } else {
        Err(Error::Compile {
            diagnostics: report.into_diagnostics(),
        })
    }
}

/// Compiles one source to our bytecode: the single call into the Luau
/// compiler for guest text (see [`crate::vm::compile`] for its bounds).
pub(crate) fn compile_source(
    name: &str,
    file: &str,
    source: &str,
    max_source_bytes: usize,
) -> Result<Arc<Vec<u8>>> {
    crate::vm::compile(name, file, source, max_source_bytes).map(Arc::new)
}

/// The file diagnostics name for module `name`: as configured, else
/// `<name with dots as slashes>.luau`.
pub(crate) fn module_file(name: &str, files: &BTreeMap<String, PathBuf>) -> String {
    files
        .get(name)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("{}.luau", name.replace('.', "/")))
}

fn finding_kind(k: &FindingKind) -> &'static str {
    match k {
        FindingKind::SyntaxError => "syntax",
        FindingKind::UngrantedGlobal => "ungranted_global",
        FindingKind::GlobalAssignment => "global_assignment",
        FindingKind::ForbiddenConstruct => "forbidden_construct",
        FindingKind::DynamicRequire => "dynamic_require",
    }
}

/// SHA-256 of a source, hex.
pub fn checksum(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Module histories from an export, checked and recompiled here, ready to
/// replace the kept histories once their newest versions went live.
pub(crate) struct PreparedImport {
    /// Every imported version per module, oldest first, with our bytecode.
    pub histories: BTreeMap<String, Vec<ModuleVersion>>,
    /// The newest source of each module: what the import's reload applies.
    pub newest: BTreeMap<String, String>,
    /// The version number each module's newest source goes live as.
    pub targets: HashMap<String, u32>,
}

/// Checks exported histories (names, version numbers, checksums) and
/// recompiles every version through [`compile_source`]: exported bytecode
/// is never loaded.
pub(crate) fn prepare_import(
    modules: BTreeMap<String, Vec<ModuleVersion>>,
    max_source_bytes: usize,
    files: &BTreeMap<String, PathBuf>,
) -> Result<PreparedImport> {
    let mut import = PreparedImport {
        histories: BTreeMap::new(),
        newest: BTreeMap::new(),
        targets: HashMap::new(),
    };
    for (name, mut versions) in modules {
        crate::config::validate_module_name(&name)?;
        versions.sort_by_key(|v| v.version);
        versions.dedup_by_key(|v| v.version);
        let Some(last) = versions.last() else {
            return Err(Error::InvalidInput(format!(
                "module `{name}`: no versions to import"
            )));
        };
        if versions.first().is_some_and(|v| v.version == 0) {
            return Err(Error::InvalidInput(format!(
                "module `{name}`: versions start at 1"
            )));
        }
        import.newest.insert(name.clone(), last.source.clone());
        import.targets.insert(name.clone(), last.version);
        let file = module_file(&name, files);
        for v in &mut versions {
            if checksum(&v.source) != v.checksum {
                return Err(Error::InvalidInput(format!(
                    "module `{name}` version {}: the source does not match its checksum",
                    v.version
                )));
            }
            v.bytecode = compile_source(&name, &file, &v.source, max_source_bytes)?;
        }
        import.histories.insert(name, versions);
    }
    Ok(import)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(checksum("").len(), 64);
        assert_eq!(&checksum("abc")[..8], "ba7816bf");
    }

    #[test]
    fn an_import_recompiles_every_version_and_checks_checksums() {
        let v = |n: u32, source: &str| ModuleVersion {
            version: n,
            checksum: checksum(source),
            source: source.into(),
            bytecode: Arc::new(Vec::new()),
            loaded_at_ms: 0.0,
            dependencies: vec![],
        };
        let mut modules = BTreeMap::new();
        modules.insert(
            "m".to_string(),
            vec![v(2, "return { v = 2 }"), v(1, "return { v = 1 }")],
        );
        let import = prepare_import(modules.clone(), 1 << 20, &BTreeMap::new()).unwrap();
        assert_eq!(import.targets["m"], 2);
        assert_eq!(import.newest["m"], "return { v = 2 }");
        let kept = &import.histories["m"];
        assert_eq!(kept.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
        assert!(kept.iter().all(|v| !v.bytecode.is_empty()));

        modules.get_mut("m").unwrap()[0].source = "return { v = 3 }".into();
        let err = prepare_import(modules, 1 << 20, &BTreeMap::new())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("does not match its checksum"),
            "{err}"
        );
    }
}
