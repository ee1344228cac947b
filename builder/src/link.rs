//! The live connection to the coordinator that jobs make data calls on
//! (`QueryPathInfos`, `DownloadNar`, `UploadNar`): a channel and the session
//! token from `Welcome`. The session publishes the current [`Link`] on a
//! `watch` channel (`None` while disconnected); jobs only read it. Its own
//! module so that the session depends on the jobs and not the other way round.

use std::time::Duration;

use farm_common::channel::MAX_MESSAGE_SIZE;
use farm_proto::auth::{JOB_METADATA, SESSION_METADATA};
use farm_proto::v1::builder_service_client::BuilderServiceClient;
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds the session token to every data call, and the job it is for (if any).
#[derive(Clone)]
pub(crate) struct SessionAuth {
    token: MetadataValue<Ascii>,
    job: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for SessionAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(SESSION_METADATA, self.token.clone());
        if let Some(job) = &self.job {
            req.metadata_mut().insert(JOB_METADATA, job.clone());
        }
        Ok(req)
    }
}

/// A data-call client that carries the session token.
pub(crate) type DataClient = BuilderServiceClient<InterceptedService<Channel, SessionAuth>>;

/// The live connection jobs use for data calls.
#[derive(Clone)]
pub(crate) struct Link {
    channel: Channel,
    auth: SessionAuth,
    /// The cache's public key from `Welcome` (`name:base64`).
    pub(crate) cache_public_key: String,
}

impl Link {
    /// A session's link: its channel, token and the cache key it announced.
    pub(crate) fn new(
        channel: Channel,
        token: MetadataValue<Ascii>,
        cache_public_key: String,
    ) -> Self {
        Link {
            channel,
            auth: SessionAuth { token, job: None },
            cache_public_key,
        }
    }

    /// Whether both are the same session (a reconnect makes a new one).
    pub(crate) fn same_session(&self, other: &Link) -> bool {
        self.auth.token == other.auth.token
    }

    /// A data-call client on this link.
    pub(crate) fn client(&self) -> DataClient {
        BuilderServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// This link for the data calls of job `job_id` (`x-farm-job`): the
    /// coordinator then takes uploads as that job's outputs and, for a claim
    /// job, lets its fetches see the job's owner's claims.
    pub(crate) fn for_job(&self, job_id: &str) -> Link {
        let mut l = self.clone();
        // Job ids are the coordinator's (`b<n>.<attempt>`): ASCII; any other
        // id is sent without the header (and so sees signed paths only).
        l.auth.job = job_id.parse().ok();
        l
    }
}

/// Wait for a link to be up (at most `wait`).
pub(crate) async fn current_link(
    rx: &mut watch::Receiver<Option<Link>>,
    wait: Duration,
) -> Option<Link> {
    let got = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
    match got {
        Ok(Ok(link)) => link.clone(),
        _ => None,
    }
}
