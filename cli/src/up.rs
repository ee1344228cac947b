//! `farm up`: a coordinator and one builder using the local Nix, in one
//! process, state in one directory.

use crate::args::UpArgs;
use crate::error::CliError;

/// Run `farm up`.
pub async fn run(_args: &UpArgs) -> Result<(), CliError> {
    Err(CliError::Usage(
        "farm up needs the coordinator and builder libraries, which this build does not have yet"
            .into(),
    ))
}
