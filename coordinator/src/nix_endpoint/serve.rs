//! The serve protocol (`nix-store --serve --write`, ssh://) over the farm:
//! queries from the cache, uploads (`AddToStoreNar`, `ImportPaths`) into it,
//! `DumpStorePath` out of it, and `BuildDerivation` as a farm build whose log
//! goes to the session's stderr while it runs (Nix shows it as the build log).

use std::collections::BTreeSet;
use std::sync::Arc;

use farm_nix::derivation::BasicDerivation;
use farm_nix::nar::NarLimits;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::serve::{BuildOptions, ServeHandler};
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildResult, BuildStatus, HandlerError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::build::{BuildBackend, BuildEvent, BuildSettings};
use super::store::FarmStore;
use crate::access::Level;
use crate::nix_endpoint::error::need_level;
use crate::nix_endpoint::ssh::ClientIdentity;

/// One serve session.
pub(crate) struct ServeSession {
    pub(super) store: FarmStore,
    pub(super) builds: Option<Arc<dyn BuildBackend>>,
    pub(super) client: ClientIdentity,
    /// The build log goes here (the client shows the remote stderr as the log).
    pub(super) stderr: Box<dyn AsyncWrite + Send + Unpin>,
    /// `--write`: uploads and builds are allowed.
    pub(super) write: bool,
}

impl ServeSession {
    fn need_write(&self, what: &str) -> Result<(), HandlerError> {
        need_level(&self.client, Level::Build, what)?;
        if self.write {
            Ok(())
        } else {
            Err(HandlerError::new(format!(
                "{what} needs write access ('nix-store --serve --write')"
            )))
        }
    }

    /// Write a log chunk; a client that stopped reading stderr does not stop the build.
    async fn log(&mut self, data: &[u8]) {
        if self.stderr.write_all(data).await.is_ok() {
            let _ = self.stderr.flush().await;
        }
    }
}

impl ServeHandler for ServeSession {
    async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        _lock: bool,
        _substitute: bool,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        self.store.valid_paths(paths).await
    }

    async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<ValidPathInfo>, HandlerError> {
        self.store.path_info(path).await
    }

    async fn nar_from_path(
        &mut self,
        path: &StorePath,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<(), HandlerError> {
        self.store.write_nar(path, out).await.map(|_| ())
    }

    async fn add_to_store_nar(
        &mut self,
        info: ValidPathInfo,
        nar: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<(), HandlerError> {
        self.need_write("adding paths")?;
        self.store.add(info, nar).await.map(|_| ())
    }

    async fn import_paths(
        &mut self,
        stream: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<(), HandlerError> {
        self.need_write("importing paths")?;
        self.store
            .import(stream, &NarLimits::default())
            .await
            .map(|_| ())
    }

    async fn query_closure(
        &mut self,
        paths: &BTreeSet<StorePath>,
        _include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, HandlerError> {
        self.store.closure(paths).await
    }

    async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, HandlerError> {
        self.need_write("building")?;
        let Some(backend) = self.builds.clone() else {
            return Ok(BuildResult::new(
                BuildStatus::MiscFailure,
                "this farm endpoint does not build",
            ));
        };
        let settings = BuildSettings {
            max_silent_time: options.max_silent_time,
            build_timeout: options.build_timeout,
        };
        let (tx, mut rx) = mpsc::channel(256);
        let build =
            backend.build_derivation(self.client.clone(), drv_path.clone(), drv, settings, tx);
        tokio::pin!(build);
        let outcome = loop {
            tokio::select! {
                r = &mut build => break r?,
                Some(ev) = rx.recv() => {
                    if let BuildEvent::Log { data, .. } = ev {
                        self.log(&data).await;
                    }
                }
            }
        };
        while let Ok(ev) = rx.try_recv() {
            if let BuildEvent::Log { data, .. } = ev {
                self.log(&data).await;
            }
        }
        Ok(outcome.to_build_result())
    }
}
