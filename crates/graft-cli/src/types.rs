//! `graft types [DIR]`: writes `graft.d.luau`, luau-lsp definitions of the
//! `graft` global and of the test library (SPEC §11), generated from the
//! tables the VM and the test runner install them from
//! ([`graft::vm::GRAFT_API`], [`crate::tester::library::TEST_API`]).
//! docs/editor.md shows how an editor uses it.

use std::path::Path;

use anyhow::{anyhow, Result};

/// The definitions file's name, in the project directory.
pub const FILE: &str = "graft.d.luau";

/// The text of `graft.d.luau`.
pub fn definitions() -> String {
    graft::vm::definitions(&crate::tester::library::definitions())
}

/// `.luaurc`: the language mode luau-lsp and `luau-analyze` use.
pub const LUAURC: &str = "{\n  \"languageMode\": \"nonstrict\"\n}\n";

/// `.vscode/settings.json`: luau-lsp reads `graft.d.luau`.
pub const VSCODE_SETTINGS: &str = "{\n  \"luau-lsp.types.definitionFiles\": [\"graft.d.luau\"],\n  \"luau-lsp.platform.type\": \"standard\",\n  \"luau-lsp.sourcemap.enabled\": false\n}\n";

/// `graft types`: writes `DIR/graft.d.luau` (or prints it with `stdout`).
pub fn run(dir: &Path, stdout: bool) -> Result<()> {
    let text = definitions();
    if stdout {
        print!("{text}");
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(anyhow!(
            "{} is not a directory; give the project directory",
            dir.display()
        ));
    }
    let path = crate::tester::report::output_path(&dir.join(FILE), "graft types")?;
    crate::tester::report::write_atomically(&path, &text)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    println!("✓ wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    //! luau-lsp and `luau-analyze` are not installable here (no registry
    //! ships them), so `graft.d.luau` is verified with the two Luau parsers
    //! at hand: the file is turned, line by line and strictly, into plain
    //! Luau (each `declare NAME: T` into `type __declared_NAME = T`, each
    //! `declare class C … end` into `type C = { … }`), which must then parse
    //! with full_moon's Luau grammar and compile with Luau's own compiler
    //! (mlua), and every type name it uses must be a builtin or declared.
    //! docs/editor.md says what this does and does not prove.

    use std::collections::BTreeSet;

    use full_moon::ast::luau::TypeInfo;
    use full_moon::visitors::Visitor;

    use super::definitions;

    /// What the strict rewrite found: the plain-Luau text, and the fields
    /// of each `declare` (global name or class name → field names).
    struct Rewritten {
        luau: String,
        declared: Vec<(String, Vec<String>)>,
    }

    fn is_ident(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// `name: type` (with `,` after it in a table) → the name.
    fn field(line: &str, comma: bool) -> Option<String> {
        let body = line.strip_prefix('\t')?;
        let body = if comma { body.strip_suffix(',')? } else { body };
        let (name, ty) = body.split_once(": ")?;
        (is_ident(name) && !ty.trim().is_empty()).then(|| name.to_string())
    }

    /// Rewrites the definitions file into plain Luau, refusing any line
    /// that is not one of the forms luau-lsp's definition files take.
    fn rewrite(defs: &str) -> Result<Rewritten, String> {
        enum In {
            Top,
            Global(String, Vec<String>),
            Class(String, Vec<String>),
        }
        let mut out = String::new();
        let mut declared = Vec::new();
        let mut state = In::Top;
        for (i, line) in defs.lines().enumerate() {
            let bad = || format!("graft.d.luau:{}: unexpected line {line:?}", i + 1);
            state = match state {
                In::Top => {
                    if line.is_empty() || line.starts_with("--") || line.starts_with("type ") {
                        out.push_str(line);
                        In::Top
                    } else if let Some(rest) = line.strip_prefix("declare class ") {
                        if !is_ident(rest) {
                            return Err(bad());
                        }
                        out.push_str(&format!("type {rest} = {{"));
                        In::Class(rest.to_string(), Vec::new())
                    } else if let Some(rest) = line.strip_prefix("declare ") {
                        let name = rest.strip_suffix(": {").ok_or_else(bad)?;
                        if !is_ident(name) {
                            return Err(bad());
                        }
                        out.push_str(&format!("type __declared_{name} = {{"));
                        In::Global(name.to_string(), Vec::new())
                    } else {
                        return Err(bad());
                    }
                }
                In::Global(name, mut fields) => {
                    if line == "}" {
                        out.push('}');
                        declared.push((name, fields));
                        In::Top
                    } else if line.starts_with("\t--- ") {
                        out.push_str(line);
                        In::Global(name, fields)
                    } else {
                        fields.push(field(line, true).ok_or_else(bad)?);
                        out.push_str(line);
                        In::Global(name, fields)
                    }
                }
                In::Class(name, mut fields) => {
                    if line == "end" {
                        out.push('}');
                        declared.push((name, fields));
                        In::Top
                    } else if line.starts_with("\t--- ") {
                        out.push_str(line);
                        In::Class(name, fields)
                    } else {
                        fields.push(field(line, false).ok_or_else(bad)?);
                        out.push_str(line);
                        out.push(',');
                        In::Class(name, fields)
                    }
                }
            };
            out.push('\n');
        }
        if !matches!(state, In::Top) {
            return Err("graft.d.luau ends inside a declaration".into());
        }
        Ok(Rewritten {
            luau: out,
            declared,
        })
    }

    /// Type names used (`Basic` types) and type aliases defined.
    #[derive(Default)]
    struct Names {
        used: BTreeSet<String>,
        defined: BTreeSet<String>,
    }

    impl Visitor for Names {
        fn visit_type_info(&mut self, t: &TypeInfo) {
            if let TypeInfo::Basic(token) = t {
                self.used.insert(token.token().to_string());
            }
        }
        fn visit_type_declaration(&mut self, d: &full_moon::ast::luau::TypeDeclaration) {
            self.defined.insert(d.type_name().token().to_string());
        }
    }

    fn check(defs: &str) -> Result<Rewritten, String> {
        let r = rewrite(defs)?;
        let parsed = full_moon::parse_fallible(&r.luau, full_moon::LuaVersion::luau());
        if let Some(e) = parsed.errors().first() {
            return Err(format!("full_moon: {e}\n{}", r.luau));
        }
        let mut names = Names::default();
        names.visit_ast(parsed.ast());
        let builtin = [
            "any", "boolean", "nil", "number", "string", "unknown", "never",
        ];
        for used in &names.used {
            if !builtin.contains(&used.as_str()) && !names.defined.contains(used) {
                return Err(format!("type `{used}` is used but never declared"));
            }
        }
        mlua::chunk::Compiler::new()
            .compile(&r.luau)
            .map_err(|e| format!("Luau's compiler: {e}"))?;
        Ok(r)
    }

    #[test]
    fn the_definitions_file_parses_as_luau_type_syntax() {
        let r = check(&definitions()).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = r.declared.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["graft", "GraftTest"]);
        // Every assertion takes the test's note last (`install_assertions`
        // reads it): the declaration must say so, or luau-lsp flags
        // correct calls such as `t.raises(f, "pattern", "why")`.
        for item in crate::tester::library::TEST_API {
            if ["deep_eq", "eq", "matches", "ok", "raises"].contains(&item.name) {
                assert!(
                    item.ty.contains("message: string?) ->"),
                    "t.{} declares no message: {}",
                    item.name,
                    item.ty
                );
            }
        }
        // The checker rejects what luau-lsp would: these must fail.
        for broken in [
            "declare graft: {\n\tcall: (target: Target -> any,\n}\n",
            "declare graft: {\n\tcall: Missing,\n}\n",
            "declare class T\n\tx: number\n",
            "declare class T\n\tx number\nend\n",
            "declare graft: {\n\tx: number\n\t-- not a doc comment\n}\n",
            "local x = 1\n",
        ] {
            assert!(check(broken).is_err(), "accepted {broken:?}");
        }
    }

    #[test]
    fn the_definitions_declare_exactly_the_keys_the_vms_install() {
        let r = check(&definitions()).unwrap_or_else(|e| panic!("{e}"));
        let fields = |n: &str| -> Vec<String> {
            let mut f = r
                .declared
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, f)| f.clone())
                .unwrap_or_default();
            f.sort();
            f
        };
        // The guest's `graft`, read from a live sandbox.
        let node = graft::Node::with_threads(1);
        let sb = graft::block_on(node.create_sandbox(graft::SandboxSpec::new("types").entry(None)))
            .unwrap();
        let keys = graft::block_on(sb.eval(
            "local ks = {} for k in graft do table.insert(ks, k) end table.sort(ks) return ks",
        ))
        .unwrap();
        assert_eq!(serde_json::json!(fields("graft")), keys);
        // The test library's `t`, as the runner builds it.
        let lua = crate::tester::library::driver_vm(
            64 << 20,
            std::time::Instant::now() + std::time::Duration::from_secs(60),
            Default::default(),
        )
        .unwrap();
        let t = crate::tester::library::install(
            &lua,
            crate::tester::library::Context {
                sandbox: sb.clone(),
                deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
                root: std::env::temp_dir(),
                timed_out: Default::default(),
            },
        )
        .unwrap();
        let mut t_keys: Vec<String> = t
            .pairs::<String, mlua::Value>()
            .map(|p| p.unwrap().0)
            .collect();
        t_keys.sort();
        assert_eq!(fields("GraftTest"), t_keys);
        let _ = node.destroy(sb.id());
    }
}
