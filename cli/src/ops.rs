//! The small commands that act on one thing: `farm logs`, `farm cancel`,
//! `farm drain`, `farm undrain`.

use std::io::Write;

use futures::StreamExt;

use crate::args::{CancelArgs, DashboardArgs, DrainArgs, LogsArgs};
use crate::client::Farm;
use crate::error::CliError;

/// `farm logs [-f] DRV|BUILD`: the log bytes, as they are, on stdout.
pub async fn logs(farm: &Farm, args: &LogsArgs) -> Result<(), CliError> {
    let mut stream = farm.logs(&args.id, args.follow).await?;
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| farm.status_error("logs", false, s))?;
        stdout
            .write_all(&chunk.data)
            .and_then(|_| stdout.flush())
            .map_err(|e| CliError::io("writing to stdout", e))?;
    }
    Ok(())
}

/// `farm cancel ID`.
pub async fn cancel(farm: &Farm, args: &CancelArgs) -> Result<(), CliError> {
    let r = farm.cancel(&args.id).await?;
    if r.cancelled == 0 {
        return Err(CliError::NotFound(format!(
            "nothing to cancel for {}: no such build or submission still running",
            args.id
        )));
    }
    println!(
        "cancelled {} build{}",
        r.cancelled,
        if r.cancelled == 1 { "" } else { "s" }
    );
    Ok(())
}

/// `farm drain|undrain BUILDER`.
/// `farm dashboard`: an admin login link for the web dashboard.
pub async fn dashboard(farm: &Farm, args: &DashboardArgs) -> Result<(), CliError> {
    let r = farm.dashboard_login(args.expires_in).await?;
    eprintln!(
        "Open this link within {} s (it works once) to use the dashboard as admin:",
        r.expires_in_secs
    );
    println!("{}", r.url);
    Ok(())
}

pub async fn drain(farm: &Farm, args: &DrainArgs, draining: bool) -> Result<(), CliError> {
    farm.set_drain(&args.builder, draining).await?;
    if draining {
        println!(
            "{}: draining (running builds finish, no new ones start; `farm undrain {}` puts it back)",
            args.builder, args.builder
        );
    } else {
        println!("{}: taking builds again", args.builder);
    }
    Ok(())
}
