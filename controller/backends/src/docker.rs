//! The docker backend: each instance is a container running a language's
//! runtime server, created through the Docker Engine API (bollard), which
//! Docker and Podman both serve.
//!
//! A container is reached over a Unix socket in a directory of its own,
//! bind-mounted at `/run/runtime`, so the controller needs no network to
//! it. The runtime server and protocol are the process backend's
//! ([`fnrt_core::runtime::remote`]); what differs is the walls, which the
//! container engine builds:
//! - no network at all (`network_mode: none`), or, for a function with
//!   `network.egress`, the process backend's: slirp4netns gives the
//!   container's namespace the internet (never the host's loopback) and an
//!   nftables ruleset narrows it to the list ([`crate::egress`]), both in
//!   place before `/init` loads the function, with its own `/etc/hosts`;
//! - a read-only root; size-capped tmpfs mounts at `/tmp` and at the
//!   function's home (`/home/function`, its cwd), and `/dev/shm` of the
//!   same size;
//! - memory (no swap), CPU and pids limits, open-file limits;
//! - every capability dropped, `no-new-privileges`, a non-root uid of its
//!   own (as root, from the instance uid range: [`crate::uids`]);
//! - an environment of `PATH`, `HOME`, `LANG` and `TMPDIR` (the function's
//!   own variables arrive with `/init`);
//! - no host path but its socket directory (with a package's files, placed
//!   read-only) and, for images built offline, the host's `/usr`, `/lib`,
//!   `/lib64` read-only (the image's `io.fnrt.host-mounts` label).
//!
//! Every container carries the labels `io.fnrt.managed` and
//! `io.fnrt.controller` (this controller's data dir, hashed): leftovers of
//! an earlier run are removed at start-up, and what is left at shutdown.
//! A container that ends (killed, out of memory) answers its run with a
//! crash (out of memory says so: the engine's `OOMKilled`, or the memory
//! cgroup's own count where the engine does not report it, `watch_oom`)
//! and is replaced by the pool. At most `DOCKER_MAX_CONTAINERS` exist.
//!
//! # Layout
//!
//! - [`DockerBackend`]: the images per language, the container spec, start,
//!   removal of leftovers, the engine's health, the container cap.
//! - `watch_oom`: out-of-memory kills on cgroup v1.
//! - [`ContainerHandle`]: one container: its output (to the run's logs and a
//!   tail for crash reports), how it ended, its removal.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, ResourcesUlimits};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures::StreamExt;

use crate::build::Builder;
use crate::deps::Installer;
use crate::packages::PackageStore;
use crate::uids::{UidLease, UidPool};
use fnrt_core::function::FunctionVersion;
use fnrt_core::language::Language;
use fnrt_core::logs::{OutputTap, Stream};
use fnrt_core::runtime::protocol::Endpoint;
use fnrt_core::runtime::remote::{Exit, InstanceHandle, RemoteInstance, RemoteSettings};
use fnrt_core::runtime::{Instance, InstanceError, RuntimeBackend, Shape, StartFor};

/// Every container this project creates.
pub const LABEL_MANAGED: &str = "io.fnrt.managed";
/// Which controller (data dir) created it.
pub const LABEL_CONTROLLER: &str = "io.fnrt.controller";
/// On an image: the server's command, a JSON array (else its entrypoint).
const LABEL_COMMAND: &str = "io.fnrt.command";
/// On an image: host paths to bind read-only (`/usr,/lib,/lib64`).
const LABEL_HOST_MOUNTS: &str = "io.fnrt.host-mounts";
/// Inside a container: the socket's directory, and the function's home.
const SOCKET_DIR: &str = "/run/runtime";
const HOME: &str = "/home/function";
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// A container with egress looks names up in its own `/etc/hosts` first.
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";
/// Bytes of stderr kept for crash reports.
const TAIL_BYTES: usize = 4096;
/// How long an engine call may take before the backend gives up on it.
const API_TIMEOUT_SECS: u64 = 30;
/// How long a shutdown waits for this controller's containers to be gone.
const SHUTDOWN_SWEEP: Duration = Duration::from_secs(10);

/// What the docker backend is given.
#[derive(Clone)]
pub struct DockerConfig {
    /// The engine's socket: `unix:///run/podman/podman.sock` (`DOCKER_HOST`).
    pub host: String,
    /// The runtime image of each language it runs.
    pub images: HashMap<Language, String>,
    /// Parent of the per-container socket directories.
    pub instances_dir: PathBuf,
    /// This controller, in the `io.fnrt.controller` label.
    pub controller_id: String,
    /// Instance uids (as root): each container runs as one of its own,
    /// which also makes the process limit (per uid) the container's.
    pub uids: Option<Arc<UidPool>>,
    /// The uid (and gid) runtimes run as inside without a uid pool.
    pub uid: u32,
    /// Size of `/tmp`, the home and `/dev/shm`.
    pub scratch_bytes: u64,
    pub max_processes: u64,
    pub max_open_files: u64,
    /// CPUs a container may use.
    pub cpus: f64,
    /// Most containers at once (warm, idle and busy); a start beyond waits.
    pub max_containers: usize,
    /// The result cap and where crates' artifacts are.
    pub remote: RemoteSettings,
    pub builder: Option<Arc<Builder>>,
    pub packages: Arc<PackageStore>,
    pub installer: Option<Arc<Installer>>,
    /// The controller's files socket, linked into every container's directory.
    pub files_socket: Option<PathBuf>,
}

/// What an image says about how to run it.
#[derive(Debug, Clone)]
struct ImageFacts {
    /// The image's id: engines resolve short names differently (Podman
    /// would look `fnrt-runtime-nodejs` up on docker.io), never an id.
    id: String,
    /// The server's command (`--socket PATH` is added), when the image's
    /// entrypoint is not it.
    command: Option<Vec<String>>,
    host_mounts: Vec<String>,
}

pub struct DockerBackend {
    config: DockerConfig,
    /// Connected on first use, so that an engine down at start-up only
    /// makes docker-placed functions unavailable.
    client: Mutex<Option<Docker>>,
    facts: Mutex<HashMap<Language, ImageFacts>>,
    /// A container was created: shutdown looks for what is left.
    used: AtomicBool,
    /// One permit per container that exists (`max_containers`).
    slots: Arc<tokio::sync::Semaphore>,
    /// slirp4netns and nft, for functions with `network.egress`.
    egress_tools: Result<(PathBuf, PathBuf), String>,
}

impl std::fmt::Debug for DockerBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerBackend")
            .field("host", &self.config.host)
            .field("images", &self.config.images)
            .finish_non_exhaustive()
    }
}

/// The engine's socket when `DOCKER_HOST` does not name one: Docker's,
/// else Podman's as root.
pub fn default_host() -> String {
    ["/var/run/docker.sock", "/run/podman/podman.sock"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .map_or_else(|| "unix:///var/run/docker.sock".to_owned(), |p| format!("unix://{p}"))
}

/// The `io.fnrt.controller` label of the controller whose data dir is
/// `data_dir`: stable across its restarts, so that its leftovers are known.
pub fn controller_id(data_dir: &Path) -> String {
    use sha2::Digest;
    let place = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    hex::encode(&sha2::Sha256::digest(place.as_os_str().as_encoded_bytes())[..8])
}

impl DockerBackend {
    /// Touches nothing: a controller that places nothing on it never
    /// connects or creates its directory.
    pub fn new(config: DockerConfig) -> anyhow::Result<Self> {
        let max_containers = config.max_containers.max(1);
        Ok(DockerBackend {
            config,
            client: Mutex::new(None),
            facts: Mutex::new(HashMap::new()),
            used: AtomicBool::new(false),
            slots: Arc::new(tokio::sync::Semaphore::new(max_containers)),
            egress_tools: match (crate::netns::find_slirp(), crate::egress::find_nft()) {
                (Some(slirp), Some(nft)) => Ok((slirp, nft)),
                _ => Err("slirp4netns and nftables are not installed (apt-get install slirp4netns nftables)".into()),
            },
        })
    }

    fn client(&self) -> Result<Docker, String> {
        let mut client = self.client.lock().unwrap();
        if let Some(docker) = client.as_ref() {
            return Ok(docker.clone());
        }
        let path = self.config.host.strip_prefix("unix://").unwrap_or(&self.config.host);
        let docker = Docker::connect_with_unix(path, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
            .map_err(|e| format!("the container engine at {} cannot be reached: {e}", self.config.host))?;
        *client = Some(docker.clone());
        Ok(docker)
    }

    /// Whether the engine answers, and its version.
    pub async fn health(&self) -> Result<String, String> {
        let docker = self.client()?;
        let version = docker
            .version()
            .await
            .map_err(|e| format!("the container engine at {} does not answer: {e}", self.config.host))?;
        Ok(version.version.unwrap_or_default())
    }

    /// Every image the backend needs, or what is missing and how to build it.
    pub async fn check_images(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        for (language, image) in &self.config.images {
            if let Err(e) = self.image_facts(*language).await {
                missing.push(format!("{image}: {e}"));
            }
        }
        match missing.is_empty() {
            true => Ok(()),
            false => Err(missing.join("; ")),
        }
    }

    /// Removes the containers an earlier run of this controller left.
    pub async fn remove_leftovers(&self) -> Result<usize, String> {
        let docker = self.client()?;
        let found = container_ids(&self.config.host, &self.config.controller_id).await?;
        for id in &found {
            remove(&docker, id).await;
        }
        Ok(found.len())
    }

    async fn image_facts(&self, language: Language) -> Result<ImageFacts, String> {
        if let Some(facts) = self.facts.lock().unwrap().get(&language) {
            return Ok(facts.clone());
        }
        let image = self
            .config
            .images
            .get(&language)
            .ok_or_else(|| format!("no runtime image is configured for {language}"))?;
        let docker = self.client()?;
        let inspected = docker.inspect_image(image).await.map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError { status_code: 404, .. } => {
                format!("the image {image} is missing: build it with `runtimes/images.sh` (docs/containers.md)")
            }
            e => format!("inspecting the image {image}: {e}"),
        })?;
        let labels = inspected
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let command = match labels.get(LABEL_COMMAND) {
            Some(json) => Some(
                serde_json::from_str::<Vec<String>>(json)
                    .map_err(|e| format!("the image {image}'s {LABEL_COMMAND} label is not a JSON array: {e}"))?,
            ),
            None => None,
        };
        let host_mounts = labels
            .get(LABEL_HOST_MOUNTS)
            .map(|m| {
                m.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let id = inspected.id.ok_or_else(|| format!("the image {image} has no id"))?;
        let facts = ImageFacts {
            id,
            command,
            host_mounts,
        };
        self.facts.lock().unwrap().insert(language, facts.clone());
        Ok(facts)
    }

    /// The container of one instance.
    fn spec(
        &self,
        facts: &ImageFacts,
        language: Language,
        dir: &Path,
        memory_mb: u64,
        owner: u32,
    ) -> ContainerCreateBody {
        let config = &self.config;
        let socket = format!("{SOCKET_DIR}/rt.sock");
        let mut binds = vec![format!("{}:{SOCKET_DIR}:rw", dir.display())];
        binds.extend(
            facts
                .host_mounts
                .iter()
                .filter(|p| Path::new(p).exists())
                .map(|p| format!("{p}:{p}:ro")),
        );
        let scratch = config.scratch_bytes;
        // 1777 rather than owned by the uid: Podman takes no uid= option.
        let tmpfs = HashMap::from([
            ("/tmp".to_owned(), format!("rw,nosuid,nodev,size={scratch},mode=1777")),
            // exec: a Rust function's library is written here and loaded.
            (
                HOME.to_owned(),
                format!("rw,nosuid,nodev,exec,size={scratch},mode=1777"),
            ),
        ]);
        let memory = (memory_mb * 1024 * 1024) as i64;
        let limit = |name: &str, n: u64| ResourcesUlimits {
            name: Some(name.to_owned()),
            soft: Some(n as i64),
            hard: Some(n as i64),
        };
        let mut command = facts.command.clone();
        if let Some(c) = command.as_mut() {
            c.extend(["--socket".to_owned(), socket.clone()]);
        }
        ContainerCreateBody {
            image: Some(facts.id.clone()),
            entrypoint: command,
            cmd: facts.command.is_none().then(|| vec!["--socket".to_owned(), socket]),
            user: Some(format!("{owner}:{owner}")),
            working_dir: Some(HOME.to_owned()),
            env: Some(vec![
                format!("PATH={PATH}"),
                format!("HOME={HOME}"),
                "LANG=C.UTF-8".to_owned(),
                "TMPDIR=/tmp".to_owned(),
            ]),
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_CONTROLLER.to_owned(), config.controller_id.clone()),
                ("io.fnrt.language".to_owned(), language.to_string()),
            ])),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                binds: Some(binds),
                network_mode: Some("none".to_owned()),
                readonly_rootfs: Some(true),
                tmpfs: Some(tmpfs),
                shm_size: Some(scratch as i64),
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some((config.cpus * 1e9) as i64),
                pids_limit: Some(config.max_processes as i64),
                // nproc counts the uid's processes on the host: only a uid
                // of the container's own makes it the container's. (Podman
                // refuses other limits without an nproc it can set.)
                ulimits: config.uids.is_some().then(|| {
                    vec![
                        limit("nofile", config.max_open_files),
                        limit("nproc", config.max_processes),
                        limit("core", 0),
                    ]
                }),
                cap_drop: Some(vec!["ALL".to_owned()]),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                privileged: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Removes a container, killing it first; best effort.
async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
    if let Err(e) = docker.remove_container(id, Some(options)).await
        && !matches!(
            e,
            bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }
        )
    {
        tracing::warn!(container = id, error = %e, "removing a container failed");
    }
}

/// The ids of the containers of the controller `controller_id`, in any
/// state, from the engine at `host` (`unix://` or a socket path).
///
/// A plain `GET /containers/json` rather than bollard's typed list, which
/// rejects the whole answer when one container is in a state Docker does
/// not have: Podman reports `stopped` between a container's exit and its
/// cleanup, just when a shutdown sweeps. Only the ids are needed.
pub async fn container_ids(host: &str, controller_id: &str) -> Result<Vec<String>, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    let path = host.strip_prefix("unix://").unwrap_or(host);
    let filters = serde_json::json!({ "label": [format!("{LABEL_CONTROLLER}={controller_id}")] });
    let query = serde_urlencoded::to_string([("all", "true"), ("filters", &filters.to_string())])
        .map_err(|e| format!("listing containers: {e}"))?;
    let list = async {
        let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = hyper::Request::get(format!("/containers/json?{query}"))
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body).trim()));
        }
        let listed: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(listed
            .iter()
            .filter_map(|c| c.get("Id")?.as_str().map(str::to_owned))
            .collect())
    };
    match tokio::time::timeout(Duration::from_secs(API_TIMEOUT_SECS), list).await {
        Ok(listed) => listed.map_err(|e| format!("listing containers at {host}: {e}")),
        Err(_) => Err(format!(
            "listing containers at {host}: no answer in {API_TIMEOUT_SECS} s"
        )),
    }
}

#[async_trait]
impl RuntimeBackend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn languages(&self) -> Vec<Language> {
        let mut languages: Vec<_> = self.config.images.keys().copied().collect();
        languages.sort();
        languages
    }

    async fn ready(&self, function: &FunctionVersion) -> Result<(), InstanceError> {
        crate::crate_ready(self.config.builder.as_ref(), function)?;
        crate::dependencies_dir(self.config.installer.as_ref(), function).map(drop)
    }

    async fn start(
        &self,
        language: Language,
        shape: &Shape,
        _purpose: StartFor,
    ) -> Result<Box<dyn Instance>, InstanceError> {
        let unavailable = |message: String| InstanceError::Unavailable { language, message };
        // A function with egress: its names resolved now, its rules ready.
        let egress = match (&self.egress_tools, shape.network.is_empty()) {
            (_, true) => None,
            (Ok((slirp, nft)), false) => Some((
                slirp.clone(),
                nft.clone(),
                crate::egress::Plan::resolve(&shape.network).await,
            )),
            (Err(e), false) => {
                return Err(unavailable(format!(
                    "this function's manifest allows egress ('network.egress'), but {e}"
                )));
            }
        };
        let image = self
            .config
            .images
            .get(&language)
            .ok_or_else(|| unavailable("not served by the docker backend".into()))?
            .clone();
        let docker = self.client().map_err(unavailable)?;
        let facts = self.image_facts(language).await.map_err(unavailable)?;
        // The pool makes room (an idle container) or waits for one.
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| InstanceError::Exhausted {
                language,
                message: format!(
                    "all {} containers (DOCKER_MAX_CONTAINERS) are in use",
                    self.config.max_containers
                ),
            })?;
        let lease = match &self.config.uids {
            Some(pool) => Some(pool.allocate().ok_or_else(|| InstanceError::Exhausted {
                language,
                message: "every instance uid is in use".into(),
            })?),
            None => None,
        };
        let uid = lease.as_ref().map_or(self.config.uid, |l| l.uid);
        let id = hex::encode(rand::random::<[u8; 6]>());
        let dir = self.config.instances_dir.join(&id);
        std::fs::create_dir_all(&self.config.instances_dir)
            .and_then(|()| std::fs::set_permissions(&self.config.instances_dir, std::fs::Permissions::from_mode(0o711)))
            .map_err(|e| unavailable(format!("creating {}: {e}", self.config.instances_dir.display())))?;
        std::fs::create_dir(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .and_then(|()| std::os::unix::fs::chown(&dir, Some(uid), Some(uid)))
            .map_err(|e| unavailable(format!("creating {}: {e}", dir.display())))?;
        crate::link_files_socket(self.config.files_socket.as_deref(), &dir);
        let name = format!(
            "fnrt-{}-{id}",
            &self.config.controller_id[..8.min(self.config.controller_id.len())]
        );
        let mut spec = self.spec(&facts, language, &dir, shape.memory_mb, uid);
        if let Some((_, _, plan)) = &egress {
            // Its own names and slirp's resolver, read-only, beside (not in)
            // the directory it may write.
            let etc = self.config.instances_dir.join(format!("{id}.etc"));
            let written = std::fs::create_dir(&etc)
                .and_then(|()| std::fs::write(etc.join("hosts"), &plan.hosts))
                .and_then(|()| std::fs::write(etc.join("resolv.conf"), &plan.resolv))
                // Names from that file first: without an nsswitch.conf glibc
                // asks DNS first, which only `*` may reach.
                .and_then(|()| std::fs::write(etc.join("nsswitch.conf"), NSSWITCH))
                .and_then(|()| {
                    // Readable by the container's uid, whatever the umask.
                    for file in ["hosts", "resolv.conf", "nsswitch.conf"] {
                        std::fs::set_permissions(etc.join(file), std::fs::Permissions::from_mode(0o644))?;
                    }
                    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755))
                });
            if let Err(e) = written {
                let _ = std::fs::remove_dir_all(&etc);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(unavailable(format!("writing the container's /etc/hosts: {e}")));
            }
            if let Some(binds) = spec.host_config.as_mut().and_then(|h| h.binds.as_mut()) {
                binds.push(format!("{}:/etc/hosts:ro", etc.join("hosts").display()));
                binds.push(format!("{}:/etc/resolv.conf:ro", etc.join("resolv.conf").display()));
                binds.push(format!("{}:/etc/nsswitch.conf:ro", etc.join("nsswitch.conf").display()));
            }
        }
        self.used.store(true, Ordering::SeqCst);
        let created = docker
            .create_container(Some(CreateContainerOptionsBuilder::default().name(&name).build()), spec)
            .await;
        let container = match created {
            Ok(c) => c.id,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(unavailable(format!("creating a container from {image}: {e}")));
            }
        };
        let mut handle = ContainerHandle {
            id: id.clone(),
            container: container.clone(),
            docker: docker.clone(),
            dir: dir.clone(),
            output: Arc::new(Output::default()),
            ended: Arc::new(AtomicBool::new(false)),
            oom: Arc::new(AtomicBool::new(false)),
            terminated: false,
            packages: self.config.packages.clone(),
            installer: self.config.installer.clone(),
            uid: lease,
            slot: Some(slot),
            network: None,
        };
        // Attached before it starts, so that nothing it writes is missed.
        let attach = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .build();
        match docker.attach_container(&container, Some(attach)).await {
            Ok(attached) => {
                tokio::spawn(drain(attached.output, handle.output.clone(), handle.ended.clone()));
            }
            Err(e) => {
                handle.terminate().await;
                return Err(unavailable(format!("attaching to the container: {e}")));
            }
        }
        if let Err(e) = docker.start_container(&container, None).await {
            handle.terminate().await;
            return Err(unavailable(format!("starting a container from {image}: {e}")));
        }
        watch_oom(&container, handle.oom.clone());
        if let Some((slirp, nft, plan)) = egress {
            let pid = docker
                .inspect_container(&container, None)
                .await
                .ok()
                .and_then(|c| c.state)
                .and_then(|s| s.pid)
                .filter(|p| *p > 0);
            let network = match pid {
                Some(pid) => crate::netns::attach(&slirp, pid as u32, Some((nft, plan.ruleset)))
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("the container's process is gone".into()),
            };
            match network {
                Ok(guard) => handle.network = Some(guard),
                Err(e) => {
                    handle.terminate().await;
                    return Err(unavailable(format!("starting the container's network: {e}")));
                }
            }
        }
        let mut instance = RemoteInstance::connect(
            Box::new(handle),
            Endpoint::Unix(dir.join("rt.sock")),
            language,
            shape.clone(),
            &self.config.remote,
        )
        .await?;
        // The runtime has made its socket; the container writes its files
        // to its tmpfs mounts, never to this directory on the host's disk.
        if let Err(e) = crate::seal_instance_dir(&dir, uid) {
            instance.terminate().await;
            return Err(unavailable(format!("sealing {}: {e}", dir.display())));
        }
        Ok(Box::new(instance))
    }

    /// Removes containers whose start was cut short by the shutdown (their
    /// handles never existed), and waits for removals already under way
    /// (a dropped handle's) to finish: the controller leaves nothing.
    async fn shutdown(&self) {
        if !self.used.load(Ordering::SeqCst) {
            return;
        }
        let mut first = None;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_SWEEP;
        loop {
            match self.remove_leftovers().await {
                Ok(0) => break,
                Ok(n) => _ = first.get_or_insert(n),
                Err(e) => {
                    tracing::warn!(error = %e, "removing this controller's containers at shutdown");
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("containers of this controller are still being removed at shutdown");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(n) = first {
            tracing::info!(containers = n, "containers of cut-short starts removed");
        }
    }
}

/// Where a container's own `/etc/hosts` and `resolv.conf` are (egress).
fn etc_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".etc");
    dir.with_file_name(name)
}

/// Where engines put a container's memory cgroup (v1, cgroupfs or systemd).
fn memory_cgroup(container: &str) -> Option<PathBuf> {
    let base = Path::new("/sys/fs/cgroup/memory");
    [
        format!("libpod_parent/libpod-{container}"),
        format!("machine.slice/libpod-{container}.scope"),
        format!("docker/{container}"),
        format!("system.slice/docker-{container}.scope"),
    ]
    .into_iter()
    .map(|c| base.join(c))
    .find(|d| d.join("memory.oom_control").exists())
}

/// Sets `flag` when the kernel kills a process of `container` for want of
/// memory. Engines report it as `OOMKilled`, except where they do not
/// (Podman with runc on cgroup v1 says false): there, the kernel's OOM
/// notification of the container's memory cgroup (an eventfd registered in
/// `cgroup.event_control`) is awaited, and the cgroup's `oom_kill` count
/// read while it still exists. Nothing is watched on cgroup v2, where
/// engines report it.
fn watch_oom(container: &str, flag: Arc<AtomicBool>) {
    use rustix::event::{EventfdFlags, eventfd};
    use std::io::Write as _;
    use std::os::fd::AsRawFd;
    let Some(cgroup) = memory_cgroup(container) else {
        tracing::debug!(
            container,
            "no v1 memory cgroup found: out-of-memory kills are the engine's to report"
        );
        return;
    };
    let Ok(control) = std::fs::File::open(cgroup.join("memory.oom_control")) else {
        return;
    };
    let Ok(event) = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK) else {
        return;
    };
    let registered = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.event_control"))
        // One write: the kernel takes the line whole or not at all.
        .and_then(|mut f| f.write_all(format!("{} {}", event.as_raw_fd(), control.as_raw_fd()).as_bytes()));
    if let Err(e) = registered {
        tracing::debug!(container, error = %e, "watching for out-of-memory kills");
        return;
    }
    // The AsyncFd owns the descriptor, so it cannot be closed while
    // registered (what `new`'s deprecation guards against).
    #[allow(deprecated)]
    let Ok(event) = tokio::io::unix::AsyncFd::new(event) else {
        return;
    };
    tokio::spawn(async move {
        // Woken by an OOM, and by the cgroup's removal (when the count
        // can no longer be read: not an OOM).
        let _control = control;
        while let Ok(mut ready) = event.readable().await {
            let mut count = [0u8; 8];
            let read = rustix::io::read(event.get_ref(), &mut count);
            ready.clear_ready();
            if read != Ok(8) {
                continue;
            }
            for _ in 0..20 {
                match crate::cgroups::oom_kills(&cgroup) {
                    Some(0) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Some(_) => {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    None => return,
                }
            }
        }
    });
}

/// A container's output: each run's lines through the tap, and the tail
/// of stderr for crash reports.
#[derive(Default)]
struct Output {
    tap: Arc<OutputTap>,
    stderr: Mutex<VecDeque<u8>>,
}

/// Reads a container's attached output until it ends (the container
/// stopped), then says so.
async fn drain(
    mut stream: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>,
    >,
    output: Arc<Output>,
    ended: Arc<AtomicBool>,
) {
    use bollard::container::LogOutput;
    while let Some(Ok(chunk)) = stream.next().await {
        match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => output.tap.feed(Stream::Stdout, &message),
            LogOutput::StdErr { message } => {
                output.tap.feed(Stream::Stderr, &message);
                let mut tail = output.stderr.lock().unwrap();
                tail.extend(message.iter());
                let excess = tail.len().saturating_sub(TAIL_BYTES);
                tail.drain(..excess);
            }
            LogOutput::StdIn { .. } => {}
        }
    }
    ended.store(true, Ordering::SeqCst);
}

/// One container the backend started.
pub struct ContainerHandle {
    id: String,
    container: String,
    docker: Docker,
    /// Its socket directory on the host.
    dir: PathBuf,
    output: Arc<Output>,
    /// Its output ended: it stopped.
    ended: Arc<AtomicBool>,
    /// The kernel killed a process of it for want of memory ([`watch_oom`]).
    oom: Arc<AtomicBool>,
    terminated: bool,
    packages: Arc<PackageStore>,
    installer: Option<Arc<Installer>>,
    /// Its uid, free again once the container is gone.
    uid: Option<UidLease>,
    /// Its place among `DOCKER_MAX_CONTAINERS`, free again likewise.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The user-mode network of a function with egress; stops with it.
    network: Option<crate::netns::SlirpGuard>,
}

impl Drop for ContainerHandle {
    fn drop(&mut self) {
        if self.terminated {
            return;
        }
        let (docker, container, dir) = (self.docker.clone(), self.container.clone(), self.dir.clone());
        let etc = etc_of(&dir);
        // The uid is free only once the container is gone.
        let held = (self.uid.take(), self.slot.take());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                remove(&docker, &container).await;
                let _ = std::fs::remove_dir_all(dir);
                let _ = std::fs::remove_dir_all(etc);
                drop(held);
            });
        }
    }
}

#[async_trait]
impl InstanceHandle for ContainerHandle {
    fn id(&self) -> &str {
        &self.id
    }

    fn output(&self) -> Option<Arc<OutputTap>> {
        Some(self.output.tap.clone())
    }

    fn is_alive(&mut self) -> bool {
        !self.terminated && !self.ended.load(Ordering::SeqCst)
    }

    async fn exited(&mut self, wait: Duration) -> Option<Exit> {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.ended.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let state = self
            .docker
            .inspect_container(&self.container, None)
            .await
            .ok()
            .and_then(|c| c.state);
        let oom_killed = state.as_ref().and_then(|s| s.oom_killed).unwrap_or(false) || self.oom.load(Ordering::SeqCst);
        let status = match state.and_then(|s| s.exit_code) {
            Some(code) if code > 128 => format!("signal: {}", code - 128),
            Some(code) => format!("exit status: {code}"),
            None => "ended".into(),
        };
        let tail = self.output.stderr.lock().unwrap();
        let (a, b) = tail.as_slices();
        Some(Exit {
            status,
            output_tail: String::from_utf8_lossy(&[a, b].concat()).into_owned(),
            oom_killed,
        })
    }

    async fn terminate(&mut self) {
        if self.terminated {
            return;
        }
        self.terminated = true;
        remove(&self.docker, &self.container).await;
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(etc_of(&dir));
            std::fs::remove_dir_all(dir)
        })
        .await;
        self.network = None;
        self.uid = None;
        self.slot = None;
    }

    async fn place_package(&mut self, function: &FunctionVersion) -> Result<(), InstanceError> {
        crate::packages::place_for(&self.packages, self.installer.as_ref(), function, &self.dir).await
    }
}
