//! `farm`: the command line to see and drive the farm.
fn main() -> anyhow::Result<()> {
    Ok(())
}
