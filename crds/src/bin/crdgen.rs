//! Writes the CustomResourceDefinitions of recsys into a directory (by default
//! `charts/recsys/crds/`), one file per kind, and the API reference into `docs/crds.md`; or
//! prints the CRDs with `--stdout`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args.next();
    if target.as_deref() == Some("--stdout") {
        for crd in recsys_crds::crds() {
            print!("---\n{}", recsys_crds::crd_yaml(&crd)?);
        }
        return Ok(());
    }
    let dir = PathBuf::from(target.unwrap_or_else(|| "charts/recsys/crds".into()));
    std::fs::create_dir_all(&dir)?;
    for crd in recsys_crds::crds() {
        let path = dir.join(recsys_crds::crd_file_name(&crd));
        std::fs::write(&path, recsys_crds::crd_yaml(&crd)?)?;
        eprintln!("wrote {}", path.display());
    }
    let reference = PathBuf::from(args.next().unwrap_or_else(|| "docs/crds.md".into()));
    std::fs::write(
        &reference,
        recsys_crds::reference::markdown(&recsys_crds::crds()),
    )?;
    eprintln!("wrote {}", reference.display());
    let features = recsys_crds::feature_docs::load(std::path::Path::new("docs/examples/features"))?;
    let catalogue = PathBuf::from("docs/FEATURE_DEFINITIONS.md");
    std::fs::write(&catalogue, recsys_crds::feature_docs::markdown(&features))?;
    eprintln!("wrote {}", catalogue.display());
    Ok(())
}
