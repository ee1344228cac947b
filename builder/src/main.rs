//! `farm-builder` binary entry point.
fn main() -> anyhow::Result<()> {
    Ok(())
}
