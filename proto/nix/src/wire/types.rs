//! Values both build protocols carry: build results and statuses, the
//! `BasicDerivation` and `ValidPathInfo` wire forms, derived paths, and the
//! error a handler reports to the client.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Limits, WireError, read_bool, read_bytes, read_count, read_opt_store_path, read_opt_string,
    read_store_path, read_store_paths, read_string, read_string_map, read_string_set, read_u64,
    write_bool, write_bytes, write_opt_store_path, write_opt_string, write_store_path,
    write_store_paths, write_string, write_string_map, write_strings, write_u64,
};
use crate::derivation::{BasicDerivation, DerivationOutput, name_from_drv_path};
use crate::hash::{Hash, HashAlgo};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;

/// An error a protocol handler reports; the server turns it into the message
/// the Nix client prints (worker: `STDERR_ERROR`; serve: the connection closes
/// and the caller should print it on stderr).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
}

impl HandlerError {
    pub fn new(message: impl fmt::Display) -> HandlerError {
        HandlerError {
            message: message.to_string(),
        }
    }

    /// The error for an operation the handler does not implement.
    pub fn unsupported(op: &str) -> HandlerError {
        HandlerError::new(format!("operation '{op}' is not supported by this store"))
    }
}

/// Outcome of a build, as Nix numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    pub fn from_u64(v: u64) -> Result<BuildStatus, WireError> {
        use BuildStatus::*;
        Ok(match v {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            value => {
                return Err(WireError::InvalidEnum {
                    what: "build status",
                    value,
                });
            }
        })
    }

    /// Whether the outputs are valid after this outcome.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// Which optional [`BuildResult`] fields a protocol version carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildResultFields {
    /// timesBuilt, isNonDeterministic, startTime, stopTime.
    pub timings: bool,
    /// cpuUser, cpuSystem (worker ≥ 1.37).
    pub cpu: bool,
    /// builtOutputs.
    pub built_outputs: bool,
}

/// The result of building a derivation.
///
/// Wire layout: `u64 status`, `errorMsg`; if timings: `u64 timesBuilt`,
/// `bool isNonDeterministic`, `u64 startTime`, `u64 stopTime`; if cpu: two
/// optional durations in µs, each `u64 0` or `u64 1, i64`; if built outputs:
/// `u64 n`, then `n` × (DrvOutput id `sha256:<hex>!<output>`, Realisation JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    pub times_built: u64,
    pub is_non_deterministic: bool,
    pub start_time: u64,
    pub stop_time: u64,
    pub cpu_user: Option<i64>,
    pub cpu_system: Option<i64>,
    /// DrvOutput id → Realisation JSON, as sent (an empty map is accepted for
    /// input-addressed builds).
    pub built_outputs: BTreeMap<String, String>,
}

impl BuildResult {
    /// A result with the given status and message and every other field empty.
    pub fn new(status: BuildStatus, error_msg: impl Into<String>) -> BuildResult {
        BuildResult {
            status,
            error_msg: error_msg.into(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }

    /// Record an output in `built_outputs` the way newer Nix does for old
    /// clients: a dummy derivation hash in the id, and the Realisation JSON
    /// (`id`, `outPath` as base name, no signatures or dependencies).
    pub fn add_built_output(&mut self, output: &str, path: &StorePath) {
        let id = format!("sha256:{}!{output}", "0".repeat(64));
        let json = serde_json::json!({
            "dependentRealisations": {},
            "id": id,
            "outPath": path.base_name(),
            "signatures": [],
        });
        self.built_outputs.insert(id, json.to_string());
    }

    /// Output name → path, read back from `built_outputs`.
    pub fn output_paths(&self) -> BTreeMap<String, StorePath> {
        let mut out = BTreeMap::new();
        for (id, json) in &self.built_outputs {
            let Some((_, name)) = id.rsplit_once('!') else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
                continue;
            };
            if let Some(p) = v.get("outPath").and_then(|p| p.as_str())
                && let Ok(p) = StorePath::from_base_name(p).or_else(|_| StorePath::parse(p))
            {
                out.insert(name.to_owned(), p);
            }
        }
        out
    }

    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        fields: BuildResultFields,
        limits: &Limits,
    ) -> Result<BuildResult, WireError> {
        let status = BuildStatus::from_u64(read_u64(r).await?)?;
        let error_msg = read_string(r, limits.max_string).await?;
        let mut res = BuildResult::new(status, error_msg);
        if fields.timings {
            res.times_built = read_u64(r).await?;
            res.is_non_deterministic = read_bool(r).await?;
            res.start_time = read_u64(r).await?;
            res.stop_time = read_u64(r).await?;
        }
        if fields.cpu {
            res.cpu_user = read_opt_micros(r).await?;
            res.cpu_system = read_opt_micros(r).await?;
        }
        if fields.built_outputs {
            res.built_outputs = read_string_map(r, limits).await?;
        }
        Ok(res)
    }

    pub async fn write<W: AsyncWrite + Unpin + ?Sized>(
        &self,
        w: &mut W,
        fields: BuildResultFields,
    ) -> Result<(), WireError> {
        write_u64(w, self.status as u64).await?;
        write_string(w, &self.error_msg).await?;
        if fields.timings {
            write_u64(w, self.times_built).await?;
            write_bool(w, self.is_non_deterministic).await?;
            write_u64(w, self.start_time).await?;
            write_u64(w, self.stop_time).await?;
        }
        if fields.cpu {
            write_opt_micros(w, self.cpu_user).await?;
            write_opt_micros(w, self.cpu_system).await?;
        }
        if fields.built_outputs {
            write_string_map(w, &self.built_outputs).await?;
        }
        Ok(())
    }
}

async fn read_opt_micros<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<i64>, WireError> {
    match read_u64(r).await? {
        0 => Ok(None),
        1 => Ok(Some(read_u64(r).await? as i64)),
        value => Err(WireError::InvalidEnum {
            what: "optional tag",
            value,
        }),
    }
}

async fn write_opt_micros<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    v: Option<i64>,
) -> Result<(), WireError> {
    match v {
        None => write_u64(w, 0).await,
        Some(v) => {
            write_u64(w, 1).await?;
            write_u64(w, v as u64).await
        }
    }
}

/// Read a `BasicDerivation` (its name is taken from `drv_path`).
///
/// Wire layout: `u64 n`, `n` × (output name, path or `""`, hashAlgo, hash),
/// inputSrcs (set of paths), platform, builder, args (list), env (`u64 n`, `n` × (key, value)).
pub async fn read_basic_derivation<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    drv_path: &StorePath,
    limits: &Limits,
) -> Result<BasicDerivation, WireError> {
    let name = name_from_drv_path(drv_path).map_err(|e| WireError::Invalid(e.to_string()))?;
    let n = read_count(r, limits).await?;
    let mut outputs = BTreeMap::new();
    for _ in 0..n {
        let out_name = read_string(r, limits.max_string).await?;
        let path = read_opt_store_path(r).await?;
        let hash_algo = read_string(r, limits.max_string).await?;
        let hash = read_string(r, limits.max_string).await?;
        outputs.insert(
            out_name,
            DerivationOutput {
                path,
                hash_algo,
                hash,
            },
        );
    }
    let input_srcs = read_store_paths(r, limits).await?;
    let platform = read_string(r, limits.max_string).await?;
    // Wire strings are bytes: the builder, args and env may hold any.
    let builder = read_bytes(r, limits.max_string).await?.into();
    let n = read_count(r, limits).await?;
    let mut args = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        args.push(read_bytes(r, limits.max_string).await?.into());
    }
    let n = read_count(r, limits).await?;
    let mut env = BTreeMap::new();
    for _ in 0..n {
        let k = read_bytes(r, limits.max_string).await?;
        let v = read_bytes(r, limits.max_string).await?;
        env.insert(k.into(), v.into());
    }
    Ok(BasicDerivation {
        name,
        outputs,
        input_srcs,
        platform,
        builder,
        args,
        env,
    })
}

/// Write a `BasicDerivation` (layout at [`read_basic_derivation`]).
pub async fn write_basic_derivation<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    drv: &BasicDerivation,
) -> Result<(), WireError> {
    write_u64(w, drv.outputs.len() as u64).await?;
    for (name, out) in &drv.outputs {
        write_string(w, name).await?;
        write_opt_store_path(w, out.path.as_ref()).await?;
        write_string(w, &out.hash_algo).await?;
        write_string(w, &out.hash).await?;
    }
    write_store_paths(w, &drv.input_srcs).await?;
    write_string(w, &drv.platform).await?;
    write_bytes(w, &drv.builder).await?;
    write_u64(w, drv.args.len() as u64).await?;
    for a in &drv.args {
        write_bytes(w, a).await?;
    }
    write_u64(w, drv.env.len() as u64).await?;
    for (k, v) in &drv.env {
        write_bytes(w, k).await?;
        write_bytes(w, v).await?;
    }
    Ok(())
}

/// Parse a NAR hash as the protocols send it: bare base16 (or nix32/base64) sha256, or prefixed.
pub fn parse_nar_hash(s: &str) -> Result<Hash, WireError> {
    Ok(Hash::parse_bare(HashAlgo::Sha256, s).or_else(|_| Hash::parse_any(s))?)
}

/// Read the fields of a `ValidPathInfo` that follow its path.
///
/// Wire layout: deriver (or `""`), narHash (base16, no prefix), references
/// (set), `u64 registrationTime`, `u64 narSize`, `bool ultimate`, sigs (set), ca (or `""`).
pub async fn read_path_info_fields<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    path: StorePath,
    limits: &Limits,
) -> Result<ValidPathInfo, WireError> {
    let deriver = read_opt_store_path(r).await?;
    let nar_hash = parse_nar_hash(&read_string(r, 256).await?)?;
    let references = read_store_paths(r, limits).await?;
    let registration_time = read_u64(r).await?;
    let nar_size = read_u64(r).await?;
    let ultimate = read_bool(r).await?;
    let sigs = read_string_set(r, limits).await?;
    let ca = read_opt_string(r, limits.max_string).await?;
    Ok(ValidPathInfo {
        path,
        deriver,
        nar_hash,
        references,
        registration_time,
        nar_size,
        ultimate,
        sigs,
        ca,
    })
}

/// Write the fields of a `ValidPathInfo` that follow its path (layout at [`read_path_info_fields`]).
pub async fn write_path_info_fields<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    info: &ValidPathInfo,
) -> Result<(), WireError> {
    write_opt_store_path(w, info.deriver.as_ref()).await?;
    write_string(w, &info.nar_hash.to_base16()).await?;
    write_store_paths(w, &info.references).await?;
    write_u64(w, info.registration_time).await?;
    write_u64(w, info.nar_size).await?;
    write_bool(w, info.ultimate).await?;
    write_strings(w, &info.sigs).await?;
    write_opt_string(w, info.ca.as_deref()).await
}

/// Read a path followed by its info fields.
pub async fn read_path_info<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<ValidPathInfo, WireError> {
    let path = read_store_path(r).await?;
    read_path_info_fields(r, path, limits).await
}

/// Write a path followed by its info fields.
pub async fn write_path_info<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    info: &ValidPathInfo,
) -> Result<(), WireError> {
    write_store_path(w, &info.path).await?;
    write_path_info_fields(w, info).await
}

/// Which outputs of a derivation are wanted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutputsSpec {
    /// `*`
    All,
    /// `out,dev`
    Names(BTreeSet<String>),
}

/// A path to realise: a store path as is, or outputs of a derivation.
///
/// Wire form (worker ≥ 1.30): a string, `/nix/store/…` or `/nix/store/….drv!out,dev` / `!*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv_path: StorePath,
        outputs: OutputsSpec,
    },
}

impl DerivedPath {
    pub fn parse(s: &str) -> Result<DerivedPath, WireError> {
        match s.split_once('!') {
            None => Ok(DerivedPath::Opaque(StorePath::parse(s)?)),
            Some((drv, outs)) => {
                let drv_path = StorePath::parse(drv)?;
                let outputs = if outs == "*" {
                    OutputsSpec::All
                } else {
                    let names: BTreeSet<String> = outs.split(',').map(str::to_owned).collect();
                    if names.iter().any(|n| n.is_empty()) {
                        return Err(WireError::Invalid(format!("invalid derived path {s:?}")));
                    }
                    OutputsSpec::Names(names)
                };
                Ok(DerivedPath::Built { drv_path, outputs })
            }
        }
    }

    pub async fn read_list<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        limits: &Limits,
    ) -> Result<Vec<DerivedPath>, WireError> {
        let n = read_count(r, limits).await?;
        let mut v = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            v.push(DerivedPath::parse(
                &read_string(r, limits.max_string).await?,
            )?);
        }
        Ok(v)
    }

    pub async fn write_list<W: AsyncWrite + Unpin + ?Sized>(
        w: &mut W,
        paths: &[DerivedPath],
    ) -> Result<(), WireError> {
        write_strings(w, paths.iter().map(|p| p.to_string())).await
    }
}

impl fmt::Display for DerivedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DerivedPath::Opaque(p) => write!(f, "{p}"),
            DerivedPath::Built { drv_path, outputs } => match outputs {
                OutputsSpec::All => write!(f, "{drv_path}!*"),
                OutputsSpec::Names(n) => {
                    write!(f, "{drv_path}!")?;
                    for (i, name) in n.iter().enumerate() {
                        if i > 0 {
                            f.write_str(",")?;
                        }
                        f.write_str(name)?;
                    }
                    Ok(())
                }
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub use farm_testkit::host::rt;

    pub use crate::nar::nar_of_bytes;

    /// A `text` store path named `name` (its hash is that of the name).
    pub fn test_path(name: &str) -> StorePath {
        StorePath::make("text", &HashAlgo::Sha256.digest(name.as_bytes()), name).unwrap()
    }

    /// A derivation building `out` with `/bin/sh`: it logs a line on stderr
    /// and writes `$text`, the first line of `input` and `input`'s path.
    pub fn test_drv(
        input: &StorePath,
        out: &StorePath,
        text: &str,
    ) -> (StorePath, BasicDerivation) {
        let drv_path = test_path(&format!("{}.drv", out.name()));
        let drv = BasicDerivation {
            name: out.name().to_owned(),
            outputs: BTreeMap::from([(
                "out".to_string(),
                DerivationOutput {
                    path: Some(out.clone()),
                    hash_algo: String::new(),
                    hash: String::new(),
                },
            )]),
            input_srcs: BTreeSet::from([input.clone()]),
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo log line from the builder >&2; read -r x < $input; echo \"$text $x $input\" > $out"
                    .into(),
            ],
            env: BTreeMap::from([
                ("builder".into(), "/bin/sh".into()),
                ("input".into(), input.to_string().into()),
                ("name".into(), out.name().into()),
                ("out".into(), out.to_string().into()),
                ("system".into(), "x86_64-linux".into()),
                ("text".into(), text.into()),
            ]),
        };
        (drv_path, drv)
    }

    /// The paths of an in-memory store (the serve and worker test handlers').
    #[derive(Default)]
    pub struct MemPaths(pub std::collections::HashMap<StorePath, (ValidPathInfo, Vec<u8>)>);

    impl MemPaths {
        pub fn len(&self) -> usize {
            self.0.len()
        }

        pub fn contains(&self, path: &StorePath) -> bool {
            self.0.contains_key(path)
        }

        pub fn info(&self, path: &StorePath) -> Option<ValidPathInfo> {
            self.0.get(path).map(|(i, _)| i.clone())
        }

        /// Write the NAR of `path`; an error if the store lacks it.
        pub async fn write_nar(
            &self,
            path: &StorePath,
            out: &mut (dyn AsyncWrite + Unpin + Send),
        ) -> Result<(), HandlerError> {
            use tokio::io::AsyncWriteExt;
            let (_, nar) = self
                .0
                .get(path)
                .ok_or_else(|| HandlerError::new(format!("path '{path}' is not valid")))?;
            out.write_all(nar).await.map_err(HandlerError::new)
        }

        /// Store `path` with the NAR read from `nar`, if its hash is the info's.
        pub async fn add(
            &mut self,
            info: ValidPathInfo,
            nar: &mut (dyn AsyncRead + Unpin + Send),
        ) -> Result<(), HandlerError> {
            use tokio::io::AsyncReadExt;
            let mut data = Vec::new();
            nar.read_to_end(&mut data)
                .await
                .map_err(HandlerError::new)?;
            if HashAlgo::Sha256.digest(&data) != info.nar_hash {
                return Err(HandlerError::new("hash mismatch"));
            }
            self.0.insert(info.path.clone(), (info, data));
            Ok(())
        }

        /// "Build" `drv`: each output becomes a file holding `$text`, referring
        /// to the inputs; a failure if an input is missing.
        pub fn build(&mut self, drv: &BasicDerivation) -> BuildResult {
            for p in &drv.input_srcs {
                if !self.contains(p) {
                    return BuildResult::new(
                        BuildStatus::MiscFailure,
                        format!("missing input {p}"),
                    );
                }
            }
            let mut res = BuildResult::new(BuildStatus::Built, "");
            for (name, out) in &drv.outputs {
                let path = out.path.clone().unwrap();
                let text = drv
                    .env
                    .get(b"text".as_slice())
                    .map(|s| s.as_bytes())
                    .unwrap_or(b"");
                let nar = nar_of_bytes(text);
                let mut info = info_for_nar(&path, &nar);
                info.references = drv.input_srcs.clone();
                self.0.insert(path.clone(), (info, nar));
                res.add_built_output(name, &path);
            }
            res
        }
    }

    /// A path info matching `nar`.
    pub fn info_for_nar(path: &StorePath, nar: &[u8]) -> ValidPathInfo {
        ValidPathInfo::new(path.clone(), HashAlgo::Sha256.digest(nar), nar.len() as u64)
    }

    pub fn arb_store_path() -> impl Strategy<Value = StorePath> {
        (
            proptest::collection::vec(any::<u8>(), 20),
            "[a-z][a-z0-9.+_-]{0,20}",
        )
            .prop_map(|(d, n)| {
                StorePath::from_digest(&d.try_into().unwrap(), &n).expect("valid name")
            })
    }

    pub fn arb_paths() -> impl Strategy<Value = BTreeSet<StorePath>> {
        proptest::collection::btree_set(arb_store_path(), 0..4)
    }

    pub fn arb_path_info() -> impl Strategy<Value = ValidPathInfo> {
        (
            arb_store_path(),
            proptest::option::of(arb_store_path()),
            proptest::collection::vec(any::<u8>(), 32),
            arb_paths(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            proptest::collection::btree_set("[a-z]+:[A-Za-z0-9+/=]{4,20}", 0..3),
            proptest::option::of("fixed:r:sha256:[a-z0-9]{10}"),
        )
            .prop_map(
                |(
                    path,
                    deriver,
                    h,
                    references,
                    registration_time,
                    nar_size,
                    ultimate,
                    sigs,
                    ca,
                )| {
                    ValidPathInfo {
                        path,
                        deriver,
                        nar_hash: Hash::from_bytes(HashAlgo::Sha256, &h).unwrap(),
                        references,
                        registration_time,
                        nar_size,
                        ultimate,
                        sigs,
                        ca,
                    }
                },
            )
    }

    pub fn arb_basic_derivation() -> impl Strategy<Value = (StorePath, BasicDerivation)> {
        (
            proptest::collection::vec(any::<u8>(), 20),
            "[a-z][a-z0-9-]{0,10}",
            proptest::collection::btree_map(
                "[a-z]{1,5}",
                (
                    proptest::option::of(arb_store_path()),
                    "|sha256|r:sha256",
                    "[0-9a-f]{0,8}",
                ),
                0..3,
            ),
            arb_paths(),
            "[a-z0-9_-]{0,12}",
            ".{0,12}",
            proptest::collection::vec(".{0,12}", 0..4),
            proptest::collection::btree_map("[A-Za-z_]{1,8}", ".{0,20}", 0..5),
        )
            .prop_map(
                |(d, name, outs, input_srcs, platform, builder, args, env)| {
                    let drv_path =
                        StorePath::from_digest(&d.try_into().unwrap(), &format!("{name}.drv"))
                            .unwrap();
                    let outputs = outs
                        .into_iter()
                        .map(|(k, (path, hash_algo, hash))| {
                            (
                                k,
                                DerivationOutput {
                                    path,
                                    hash_algo,
                                    hash,
                                },
                            )
                        })
                        .collect();
                    (
                        drv_path,
                        BasicDerivation {
                            name,
                            outputs,
                            input_srcs,
                            platform,
                            // bytes that are not UTF-8 travel too
                            builder: [builder.as_bytes(), b"\xff"].concat().into(),
                            args: args.into_iter().map(Into::into).collect(),
                            env: env
                                .into_iter()
                                .map(|(k, v): (String, String)| {
                                    (k.into(), [v.as_bytes(), b"\x80"].concat().into())
                                })
                                .collect(),
                        },
                    )
                },
            )
    }

    pub fn arb_build_result(fields: BuildResultFields) -> impl Strategy<Value = BuildResult> {
        (
            0u64..15,
            ".{0,20}",
            any::<(u64, bool, u64, u64)>(),
            any::<(Option<i64>, Option<i64>)>(),
            proptest::collection::btree_map("[a-z0-9:!]{1,20}", "[{}a-z\":]{0,30}", 0..3),
        )
            .prop_map(move |(s, msg, t, c, outs)| {
                let mut r = BuildResult::new(BuildStatus::from_u64(s).unwrap(), msg);
                if fields.timings {
                    (
                        r.times_built,
                        r.is_non_deterministic,
                        r.start_time,
                        r.stop_time,
                    ) = t;
                }
                if fields.cpu {
                    (r.cpu_user, r.cpu_system) = c;
                }
                if fields.built_outputs {
                    r.built_outputs = outs;
                }
                r
            })
    }

    proptest! {
        #[test]
        fn path_info_roundtrip(info in arb_path_info()) {
            rt().block_on(async {
                let mut out = Vec::new();
                write_path_info(&mut out, &info).await.unwrap();
                let mut r = &out[..];
                prop_assert_eq!(read_path_info(&mut r, &Limits::default()).await.unwrap(), info);
                prop_assert!(r.is_empty());
                Ok(())
            })?;
        }

        #[test]
        fn basic_derivation_roundtrip((drv_path, drv) in arb_basic_derivation()) {
            rt().block_on(async {
                let mut out = Vec::new();
                write_basic_derivation(&mut out, &drv).await.unwrap();
                let mut r = &out[..];
                prop_assert_eq!(read_basic_derivation(&mut r, &drv_path, &Limits::default()).await.unwrap(), drv);
                prop_assert!(r.is_empty());
                Ok(())
            })?;
        }

        #[test]
        fn build_result_roundtrip((fields, res) in any::<(bool, bool, bool)>().prop_flat_map(|(t, c, b)| {
            let f = BuildResultFields { timings: t, cpu: c, built_outputs: b };
            (Just(f), arb_build_result(f))
        })) {
            rt().block_on(async {
                let mut out = Vec::new();
                res.write(&mut out, fields).await.unwrap();
                let mut r = &out[..];
                prop_assert_eq!(BuildResult::read(&mut r, fields, &Limits::default()).await.unwrap(), res);
                prop_assert!(r.is_empty());
                Ok(())
            })?;
        }
    }

    #[test]
    fn derived_paths() {
        for s in [
            "/nix/store/00000000000000000000000000000000-a.drv!*",
            "/nix/store/00000000000000000000000000000000-a.drv!dev,out",
            "/nix/store/00000000000000000000000000000000-a",
        ] {
            assert_eq!(DerivedPath::parse(s).unwrap().to_string(), s);
        }
        assert!(DerivedPath::parse("/nix/store/00000000000000000000000000000000-a.drv!").is_err());
        assert!(DerivedPath::parse("/tmp/x").is_err());
    }

    #[test]
    fn built_outputs_helpers() {
        let p = StorePath::parse("/nix/store/00000000000000000000000000000000-a").unwrap();
        let mut r = BuildResult::new(BuildStatus::Built, "");
        r.add_built_output("out", &p);
        assert_eq!(r.output_paths().get("out"), Some(&p));
        assert!(BuildStatus::Built.is_success());
        assert!(!BuildStatus::MiscFailure.is_success());
        assert!(BuildStatus::from_u64(99).is_err());
    }
}
