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
    let path = dir.join(FILE);
    std::fs::write(&path, text).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    println!("✓ wrote {}", path.display());
    Ok(())
}
