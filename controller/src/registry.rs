//! The function registry: which functions exist, their versions, and the
//! bundled `functions/` folder.
//!
//! Writes go to the [`FunctionStore`] first, then to the in-memory map, so reads
//! (initialize, listings, details) never touch the database. Versions are
//! immutable: a session keeps the `Arc<FunctionVersion>` it started with.
//!
//! # Layout
//!
//! - [`manifest`]: `function.json` / registration body, checked and normalised.
//! - this module: [`Registry`], [`FunctionVersion`], bundle loading.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use time::OffsetDateTime;

pub use fnrt_core::function::manifest::{self, CrateFiles, FunctionSpec, Manifest, ManifestError};
use fnrt_core::function::package;
pub use fnrt_core::function::{CheckError, Code, CodeCheck, FileContent, FunctionVersion, PackageFiles, PackageLimits};

use crate::auth::{ADMIN_FUNCTIONS, Subject};
use crate::store::{FunctionStore, NewVersion, Source, StoreError, StoredFunction, StoredVersion, VersionInfo};
use fnrt_core::artifact::BuildFailure;
use fnrt_core::language::{CRATE_ENTRYPOINT, Language, LanguageTitle};

/// A function and its current version.
#[derive(Debug, Clone)]
pub struct FunctionEntry {
    pub source: Source,
    /// The subject that registered it (None: bundled): it reads every
    /// execution's logs.
    pub owner: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub current: Arc<FunctionVersion>,
}

impl FunctionEntry {
    /// Whether `subject` manages this function (updates it, deletes it,
    /// reads every caller's logs): it registered it, or it holds
    /// `admin:functions` (an operator: bundled functions have no owner, and
    /// anyone's function may need taking down).
    pub fn managed_by(&self, subject: &Subject) -> bool {
        manages(subject, self.owner.as_deref())
    }

    fn from_stored(f: StoredFunction) -> anyhow::Result<Self> {
        Ok(FunctionEntry {
            current: Arc::new(version_from_stored(f.current, f.owner.clone())?),
            source: f.source,
            owner: f.owner,
            created_at: f.created_at,
            updated_at: f.updated_at,
        })
    }
}

/// What [`Registry::refresh`] found another replica changed.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Deleted.
    pub gone: Vec<String>,
    /// Deleted and registered again: a new registration.
    pub reborn: Vec<String>,
}

/// Why a registry write failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Invalid(#[from] ManifestError),
    /// A package with more files or bytes than allowed.
    #[error("{0}")]
    TooLarge(String),
    #[error("function '{0}' already exists; update it with PUT")]
    Exists(String),
    #[error("function '{0}' not found")]
    NotFound(String),
    #[error(
        "function '{0}' was registered by another subject: only that subject (or a holder of scope '{ADMIN_FUNCTIONS}') updates or deletes it"
    )]
    NotOwner(String),
    #[error("function '{0}' is bundled with the controller: updating or deleting it needs scope '{ADMIN_FUNCTIONS}'")]
    Bundled(String),
    #[error(
        "the functions of '{owner}' would take more than their quota of {quota} bytes (FUNCTIONS_QUOTA_MB; every \
         version counts, with the dependencies installed for it; {used} taken): delete older versions \
         (DELETE /api/v1/functions/{{language_title}}/versions/{{version}}) or a function no longer needed"
    )]
    OverQuota { owner: String, used: i64, quota: i64 },
    #[error("function '{0}' has no version {1}")]
    NoSuchVersion(String, i64),
    #[error(
        "version {1} is the current version of function '{0}': register a new version first (PUT), or delete the function"
    )]
    CurrentVersion(String, i64),
    #[error("function '{0}' kept getting new versions while this ran; try again")]
    Changed(String),
    #[error("{}", .0.message)]
    BuildFailed(BuildFailure),
    #[error("the function store is unavailable; try again")]
    Unavailable(#[source] StoreError),
    #[error(transparent)]
    Store(anyhow::Error),
}

/// [`RegistryError::OverQuota`] for `owner` from the store's refusal; any
/// other error as it is.
fn over_quota(e: StoreError, owner: &str) -> RegistryError {
    match e {
        StoreError::OverQuota { used, quota } => RegistryError::OverQuota {
            owner: owner.to_owned(),
            used,
            quota,
        },
        e => e.into(),
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            RegistryError::Unavailable(e)
        } else {
            RegistryError::Store(e.into())
        }
    }
}

/// A function's code as registered.
#[derive(Debug, Clone)]
pub enum Submission {
    /// One source file (`code`), or a crate's files in their stored form.
    Source(String),
    /// Files (`files`, an archive, a folder): a Rust crate for `rust-*` and
    /// `wasm-*` functions, a package for Node and Python.
    Files(PackageFiles),
}

pub struct Registry {
    store: Arc<dyn FunctionStore>,
    /// How large a package may be.
    package_limits: PackageLimits,
    /// Most steps of a pipeline.
    pipeline_max_steps: usize,
    /// `FUNCTIONS_QUOTA_MB` in bytes: the most one owner's functions take,
    /// every version counted.
    quota: Option<i64>,
    /// Asked before any version is stored.
    checker: Option<Arc<dyn CodeCheck>>,
    /// Current version of every function, sorted by Language-Title for listings.
    functions: RwLock<BTreeMap<String, FunctionEntry>>,
    /// Older versions that sessions still ask for, loaded from the store on demand.
    /// Keyed by registration too: a name deleted and registered again
    /// numbers its versions from 1 again.
    versions: moka::sync::Cache<(String, Arc<str>, i64), Arc<FunctionVersion>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Loads every function from the store.
    pub async fn load(store: Arc<dyn FunctionStore>, checker: Option<Arc<dyn CodeCheck>>) -> anyhow::Result<Self> {
        let mut functions = BTreeMap::new();
        for f in store.functions().await? {
            let lt = f.language_title.clone();
            match FunctionEntry::from_stored(f) {
                Ok(entry) => {
                    functions.insert(lt, entry);
                }
                Err(e) => {
                    tracing::error!(language_title = %lt, error = format!("{e:#}"), "skipping unreadable function")
                }
            }
        }
        Ok(Registry {
            store,
            package_limits: PackageLimits::default(),
            pipeline_max_steps: fnrt_core::function::pipeline::DEFAULT_MAX_STEPS,
            quota: None,
            checker,
            functions: RwLock::new(functions),
            // Weighed by code size: a package may be tens of MB.
            versions: moka::sync::Cache::builder()
                .max_capacity(256 * 1024 * 1024)
                // A version deleted through another replica is let go of
                // here within this long.
                .time_to_live(std::time::Duration::from_secs(60))
                .weigher(|_, v: &Arc<FunctionVersion>| v.code.len().try_into().unwrap_or(u32::MAX))
                .build(),
        })
    }

    /// Sets how many steps a pipeline may have.
    pub fn with_pipeline_max_steps(mut self, max: usize) -> Self {
        self.pipeline_max_steps = max;
        self
    }

    /// Sets the most one owner's functions may take, in bytes.
    pub fn with_quota(mut self, quota: Option<u64>) -> Self {
        self.quota = quota.map(|q| i64::try_from(q).unwrap_or(i64::MAX));
        self
    }

    /// Sets how large a package may be.
    pub fn with_package_limits(mut self, limits: PackageLimits) -> Self {
        self.package_limits = limits;
        self
    }

    /// How large a package may be.
    pub fn package_limits(&self) -> PackageLimits {
        self.package_limits
    }

    /// The function and its current version, if registered (memory only).
    pub fn get(&self, language_title: &str) -> Option<FunctionEntry> {
        self.functions.read().unwrap().get(language_title).cloned()
    }

    /// The registered Language-Title nearest to `wanted` among those `keep`
    /// accepts (a typo's likely meaning): at most two edits away, or one
    /// for short titles.
    pub fn closest(&self, wanted: &str, keep: impl Fn(&str) -> bool) -> Option<String> {
        let functions = self.functions.read().unwrap();
        functions
            .keys()
            .filter(|name| keep(name))
            .map(|name| (strsim::levenshtein(wanted, name), name))
            .filter(|(d, _)| *d > 0 && *d <= if wanted.len() < 10 { 1 } else { 2 })
            .min()
            .map(|(_, name)| name.clone())
    }

    /// Like [`Self::get`], but a function this replica has not seen yet
    /// (registered through another replica) is looked up in the store.
    pub async fn find(&self, language_title: &str) -> Result<Option<FunctionEntry>, RegistryError> {
        if let Some(f) = self.get(language_title) {
            return Ok(Some(f));
        }
        match self.store.function(language_title).await.map_err(RegistryError::from)? {
            Some(stored) => Ok(Some(self.remember(stored)?)),
            None => Ok(None),
        }
    }

    /// Catches up with changes other replicas made to the shared store:
    /// new and updated functions are loaded, deleted ones forgotten, and
    /// one deleted and registered again (a new registration, whose version
    /// numbers start over) replaces the old. Cheap when nothing changed
    /// (one query of names, registrations and version numbers). Answers
    /// what another replica deleted, and what it registered again.
    pub async fn refresh(&self) -> anyhow::Result<Refreshed> {
        let current: HashMap<String, (String, i64)> = self
            .store
            .current_versions()
            .await?
            .into_iter()
            .map(|(lt, registration, version)| (lt, (registration, version)))
            .collect();
        let (stale, gone, reborn) = {
            let functions = self.functions.read().unwrap();
            let mut stale = Vec::new();
            let mut reborn = Vec::new();
            for (lt, (registration, version)) in &current {
                match functions.get(lt) {
                    Some(f) if *f.current.registration != **registration => reborn.push(lt.clone()),
                    Some(f) if f.current.version == *version => continue,
                    _ => {}
                }
                stale.push(lt.clone());
            }
            let gone: Vec<String> = functions
                .keys()
                .filter(|lt| !current.contains_key(*lt))
                .cloned()
                .collect();
            (stale, gone, reborn)
        };
        for lt in stale {
            if let Some(stored) = self.store.function(&lt).await? {
                self.remember(stored).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        if !gone.is_empty() {
            let mut functions = self.functions.write().unwrap();
            for lt in &gone {
                functions.remove(lt);
            }
        }
        if !gone.is_empty() || !reborn.is_empty() {
            // Older versions kept here may be a deleted registration's.
            self.versions.invalidate_all();
        }
        Ok(Refreshed { gone, reborn })
    }

    /// The install keys of every function's current version (as of the
    /// last [`Registry::refresh`]): the installs to keep.
    pub fn dependency_keys(&self) -> HashSet<String> {
        self.functions
            .read()
            .unwrap()
            .values()
            .filter_map(|f| f.current.dependencies.as_ref().map(|d| d.key().to_owned()))
            .collect()
    }

    /// The code hashes of every function's current version (as of the last
    /// [`Registry::refresh`]): the package files to keep.
    pub fn code_hashes(&self) -> HashSet<String> {
        self.functions
            .read()
            .unwrap()
            .values()
            .map(|f| f.current.code_hash.clone())
            .collect()
    }

    /// One page of the functions, optionally of one language, and the total.
    pub fn list(&self, language: Option<Language>, page: usize, per_page: usize) -> (usize, Vec<FunctionEntry>) {
        let functions = self.functions.read().unwrap();
        let matching = || {
            functions
                .values()
                .filter(move |f| language.is_none_or(|l| f.current.language() == l))
        };
        let total = matching().count();
        let items = matching()
            .skip(page.saturating_sub(1).saturating_mul(per_page))
            .take(per_page)
            .cloned()
            .collect();
        (total, items)
    }

    /// A given version of a function: the current one from memory, an older
    /// one from the store.
    pub async fn version(&self, language_title: &str, version: i64) -> anyhow::Result<Option<Arc<FunctionVersion>>> {
        let known = self.get(language_title);
        if let Some(f) = &known
            && f.current.version == version
        {
            return Ok(Some(f.current.clone()));
        }
        let key = known
            .as_ref()
            .map(|f| (language_title.to_owned(), f.current.registration.clone(), version));
        if let Some(v) = key.as_ref().and_then(|key| self.versions.get(key)) {
            return Ok(Some(v));
        }
        let Some(stored) = self.store.version(language_title, version).await? else {
            return Ok(None);
        };
        // An older version's owner is the function's: deleting a function
        // deletes its versions.
        let owner = match known {
            Some(f) if *f.current.registration == *stored.registration => f.owner,
            _ => self.store.function(language_title).await?.and_then(|f| f.owner),
        };
        let v = Arc::new(version_from_stored(stored, owner)?);
        // Kept only under the registration it belongs to (one deleted
        // meanwhile is not).
        if let Some(key) = key.filter(|key| key.1 == v.registration) {
            self.versions.insert(key, v.clone());
        }
        Ok(Some(v))
    }

    /// Registers a new function at version 1, owned by `owner`.
    pub async fn create(
        &self,
        lt: &LanguageTitle,
        spec: FunctionSpec,
        code: Submission,
        owner: &str,
    ) -> Result<FunctionEntry, RegistryError> {
        self.quota_check(Some(owner)).await?;
        let new = self.prepare(lt, spec, code, true, Some(owner)).await?;
        match self.store.create(new, Source::Api).await {
            Ok(f) => self.remember(f),
            Err(StoreError::Conflict) => Err(RegistryError::Exists(lt.to_string())),
            Err(e) => Err(over_quota(e, owner)),
        }
    }

    /// Registers the next version of an existing function, for a subject
    /// that manages it ([`FunctionEntry::managed_by`]).
    pub async fn update(
        &self,
        lt: &LanguageTitle,
        spec: FunctionSpec,
        code: Submission,
        subject: &Subject,
    ) -> Result<FunctionEntry, RegistryError> {
        // Refused before anything is built or installed for it; the store
        // checks again where it writes.
        let owner = self.manager_check(lt, subject).await?;
        self.quota_check(owner.as_deref()).await?;
        let new = self.prepare(lt, spec, code, true, owner.as_deref()).await?;
        let writer = owner.as_deref().unwrap_or(&subject.sub);
        match self.store.add_version(new, Source::Api, Some(writer)).await {
            Ok(f) => self.remember(f),
            Err(StoreError::NotFound) => Err(RegistryError::NotFound(lt.to_string())),
            Err(StoreError::NotOwner) => Err(RegistryError::NotOwner(lt.to_string())),
            Err(e) => Err(over_quota(e, writer)),
        }
    }

    /// Deletes a function and all its versions, for a subject that manages
    /// it.
    pub async fn delete(&self, lt: &LanguageTitle, subject: &Subject) -> Result<(), RegistryError> {
        let owner = self.manager_check(lt, subject).await?;
        let writer = owner.as_deref().unwrap_or(&subject.sub);
        match self.store.delete(lt.as_str(), Some(writer)).await {
            Ok(true) => {}
            Ok(false) => return Err(RegistryError::NotFound(lt.to_string())),
            Err(StoreError::NotOwner) => return Err(RegistryError::NotOwner(lt.to_string())),
            Err(e) => return Err(e.into()),
        }
        self.functions.write().unwrap().remove(lt.as_str());
        // Deletes are rare: forgetting every cached old version is simpler
        // than picking this function's, and a re-registered function must
        // never find its deleted versions here.
        self.versions.invalidate_all();
        Ok(())
    }

    /// A page of a function's versions, newest first, and how many it has;
    /// `None` if the function does not exist.
    pub async fn versions(
        &self,
        lt: &LanguageTitle,
        page: usize,
        per_page: usize,
    ) -> Result<Option<(FunctionEntry, i64, Vec<VersionInfo>)>, RegistryError> {
        let Some(f) = self.find(lt.as_str()).await? else {
            return Ok(None);
        };
        let offset = page.saturating_sub(1).saturating_mul(per_page);
        let (total, versions) = self
            .store
            .versions(lt.as_str(), offset.try_into().unwrap_or(i64::MAX), per_page as i64)
            .await?;
        Ok(Some((f, total, versions)))
    }

    /// Deletes one older version of a function, for a subject that manages
    /// it: what it takes no longer counts against its owner's quota, and
    /// what is pinned to it (sessions, queued executions) can no longer
    /// run. The current version is not deleted this way
    /// ([`RegistryError::CurrentVersion`]). An install the version brought
    /// and the current version shares stays charged (once), to the current
    /// one.
    pub async fn delete_version(
        &self,
        lt: &LanguageTitle,
        version: i64,
        subject: &Subject,
    ) -> Result<(), RegistryError> {
        let owner = self.manager_check(lt, subject).await?;
        let writer = owner.as_deref().unwrap_or(&subject.sub);
        let not_found = || RegistryError::NotFound(lt.to_string());
        // Once more if another version was registered meanwhile (here or on
        // another replica): the install is weighed against the new one.
        for attempt in 0..2 {
            let current = match attempt {
                0 => self.find(lt.as_str()).await?.ok_or_else(not_found)?,
                _ => self
                    .store
                    .function(lt.as_str())
                    .await?
                    .map(|f| self.remember(f))
                    .transpose()?
                    .ok_or_else(not_found)?,
            };
            if current.current.version == version {
                return Err(RegistryError::CurrentVersion(lt.to_string(), version));
            }
            let Some(old) = self.version(lt.as_str(), version).await.map_err(RegistryError::Store)? else {
                return Err(RegistryError::NoSuchVersion(lt.to_string(), version));
            };
            let key = |v: &FunctionVersion| v.dependencies.as_ref().map(|d| d.key().to_owned());
            let shared_install = key(&old).is_some() && key(&old) == key(&current.current);
            match self
                .store
                .delete_version(
                    lt.as_str(),
                    version,
                    Some(writer),
                    current.current.version,
                    shared_install,
                )
                .await
            {
                Ok(true) => {
                    self.versions.invalidate_all();
                    return Ok(());
                }
                Ok(false) => return Err(RegistryError::NoSuchVersion(lt.to_string(), version)),
                Err(StoreError::CurrentChanged) => continue,
                Err(StoreError::IsCurrent) => return Err(RegistryError::CurrentVersion(lt.to_string(), version)),
                Err(StoreError::NotFound) => return Err(not_found()),
                Err(StoreError::NotOwner) => return Err(RegistryError::NotOwner(lt.to_string())),
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Changed(lt.to_string()))
    }

    /// The owner of `lt` (`None`: bundled), once `subject` is known to
    /// manage it: [`RegistryError::NotOwner`], `Bundled` or `NotFound`
    /// otherwise. A function this replica has not seen yet is read from
    /// the store. The store's write is guarded by this owner (an operator
    /// writes as it), so a function deleted and registered again by
    /// someone else meanwhile is not written.
    async fn manager_check(&self, lt: &LanguageTitle, subject: &Subject) -> Result<Option<String>, RegistryError> {
        let owner = match self.get(lt.as_str()) {
            Some(f) => f.owner,
            None => match self.store.function(lt.as_str()).await? {
                Some(f) => f.owner,
                None => return Err(RegistryError::NotFound(lt.to_string())),
            },
        };
        match (manages(subject, owner.as_deref()), &owner) {
            (true, _) => Ok(owner),
            (false, Some(_)) => Err(RegistryError::NotOwner(lt.to_string())),
            (false, None) => Err(RegistryError::Bundled(lt.to_string())),
        }
    }

    /// Refuses at once, before anything is built or installed, a
    /// registration by an owner whose functions already fill its quota
    /// (the store checks the new version's own size where it writes).
    async fn quota_check(&self, owner: Option<&str>) -> Result<(), RegistryError> {
        let (Some(owner), Some(quota)) = (owner, self.quota) else {
            return Ok(());
        };
        let used = self.store.function_bytes(owner).await?;
        if used >= quota {
            return Err(over_quota(StoreError::OverQuota { used, quota }, owner));
        }
        Ok(())
    }

    /// A version checked (built, installed) and ready to store, for a
    /// function owned by `owner` (`None`: bundled).
    async fn prepare(
        &self,
        lt: &LanguageTitle,
        mut spec: FunctionSpec,
        code: Submission,
        build: bool,
        owner: Option<&str>,
    ) -> Result<NewVersion, RegistryError> {
        let language = lt.language();
        let invalid = |m: String| RegistryError::Invalid(ManifestError(m));
        if language == Language::Pipeline {
            if !matches!(&code, Submission::Source(c) if c.is_empty()) {
                return Err(invalid(
                    "a pipeline has no code ('code', 'files', 'archive'): its manifest lists its 'steps'".into(),
                ));
            }
            let manifest = spec.normalize_pipeline(self.pipeline_max_steps)?;
            self.check_steps(&manifest)?;
            return Ok(NewVersion {
                language_title: lt.to_string(),
                language: language.to_string(),
                title: lt.title().to_owned(),
                description: manifest.description.clone(),
                code_hash: manifest.code_hash(""),
                manifest: serde_json::to_value(&manifest).map_err(|e| RegistryError::Store(e.into()))?,
                code: String::new(),
                owner: owner.map(str::to_owned),
                quota: owner.and(self.quota),
                installed_bytes: 0,
            });
        }
        let (manifest, code) = match code {
            Submission::Source(code) => {
                let manifest = spec.normalize(language)?;
                (manifest, code)
            }
            // A Rust crate's files (Rust natively, or built to wasm).
            Submission::Files(files) if matches!(language, Language::Rust | Language::Wasm) => {
                let mut texts = CrateFiles::new();
                for (path, content) in files {
                    match content {
                        FileContent::Text(text) => texts.insert(path, text),
                        FileContent::Binary { .. } => {
                            return Err(invalid(format!("'files.{path}' of a Rust crate must be text")));
                        }
                    };
                }
                spec.entrypoint.get_or_insert_with(|| CRATE_ENTRYPOINT.to_owned());
                (spec.normalize(language)?, manifest::crate_code(&texts))
            }
            Submission::Files(files) => {
                let manifest = spec.normalize_as(language, true)?;
                (manifest, package::package_code(&files))
            }
        };
        let files = match manifest.is_crate() {
            true => Some(manifest::crate_files(&code)?),
            false => None,
        };
        let package = match manifest.package {
            true => Some(
                package::check_package(&code, language, &manifest.entrypoint, self.package_limits).map_err(
                    |e| match e {
                        package::PackageError::Invalid(e) => RegistryError::Invalid(e),
                        package::PackageError::TooLarge(m) => RegistryError::TooLarge(m),
                    },
                )?,
            ),
            false => None,
        };
        if files.is_none() && package.is_none() {
            manifest::check_code(&code)?;
        }
        let mut installed_bytes = 0;
        if let Some(checker) = &self.checker {
            let checked = match (&files, &package) {
                (Some(files), _) => Code::Crate { files, owner },
                (None, Some(package)) => Code::Package {
                    files: package,
                    scripts: manifest.install.scripts,
                },
                (None, None) => Code::File {
                    entrypoint: &manifest.entrypoint,
                    text: &code,
                },
            };
            installed_bytes = checker.check(language, checked, build).await.map_err(|e| match e {
                CheckError::Invalid(message) => RegistryError::Invalid(ManifestError(message)),
                CheckError::BuildFailed(failure) => RegistryError::BuildFailed(failure),
            })?;
        }
        // A function's install is charged to the version that brought it:
        // a new version on its current version's set adds only its code.
        let set = package
            .as_ref()
            .and_then(|p| package::DependencyFiles::of(language, p, manifest.install.scripts));
        if let (Some(set), Some(current)) = (&set, self.get(lt.as_str()))
            && current.current.dependencies.as_ref().map(|d| d.key()) == Some(set.key())
        {
            installed_bytes = 0;
        }
        Ok(NewVersion {
            language_title: lt.to_string(),
            language: lt.language().to_string(),
            title: lt.title().to_owned(),
            description: manifest.description.clone(),
            code_hash: manifest.code_hash(&code),
            manifest: serde_json::to_value(&manifest).map_err(|e| RegistryError::Store(e.into()))?,
            code,
            owner: owner.map(str::to_owned),
            quota: owner.and(self.quota),
            installed_bytes,
        })
    }

    /// A pipeline's steps against the functions registered now: each
    /// exists, and a step whose params are an object gives every property
    /// its function's schema requires.
    fn check_steps(&self, manifest: &Manifest) -> Result<(), RegistryError> {
        let Some(pipeline) = &manifest.pipeline else {
            return Ok(());
        };
        for step in &pipeline.steps {
            let Some(function) = self.get(&step.function) else {
                let hint = self
                    .closest(&step.function, |_| true)
                    .map(|near| format!("; did you mean '{near}'?"))
                    .unwrap_or_default();
                return Err(RegistryError::Invalid(ManifestError(format!(
                    "step '{}': function '{}' not found{hint}",
                    step.name, step.function
                ))));
            };
            if let Some(serde_json::Value::Object(given)) = &step.params {
                let required = function.current.manifest.schema.params["required"].as_array().cloned();
                for name in required.unwrap_or_default().iter().filter_map(|v| v.as_str()) {
                    if !given.contains_key(name) {
                        return Err(RegistryError::Invalid(ManifestError(format!(
                            "step '{}': 'params' lacks '{name}', which {} requires",
                            step.name, step.function
                        ))));
                    }
                }
            }
        }
        Ok(())
    }

    fn remember(&self, stored: StoredFunction) -> Result<FunctionEntry, RegistryError> {
        let entry = FunctionEntry::from_stored(stored).map_err(RegistryError::Store)?;
        let mut functions = self.functions.write().unwrap();
        let lt = entry.current.language_title.to_string();
        // Two concurrent updates may finish out of order; keep the newest.
        // Another registration (deleted and registered again) replaces it.
        match functions.get(&lt) {
            Some(existing)
                if existing.current.registration == entry.current.registration
                    && existing.current.version > entry.current.version => {}
            _ => {
                functions.insert(lt, entry.clone());
            }
        }
        Ok(entry)
    }

    /// Registers every folder of `dir` (`functions/`): a new function is
    /// created, a bundled one whose code changed gets a new version, one
    /// changed through the API is left alone. A broken folder is logged and
    /// skipped so that one bad function does not stop the controller.
    pub async fn load_bundled(&self, dir: &Path) -> anyhow::Result<usize> {
        let mut loaded = 0;
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading functions folder {}", dir.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.path().join("function.json").is_file())
            .collect();
        // Pipelines last: their steps must exist when they are checked.
        entries.sort_by_key(|e| (e.file_name().to_string_lossy().starts_with("pipeline-"), e.file_name()));
        for entry in entries {
            let path = entry.path();
            match self.load_folder(&path).await {
                Ok(true) => loaded += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(folder = %path.display(), error = format!("{e:#}"), "skipping bundled function")
                }
            }
        }
        Ok(loaded)
    }

    /// Registers one folder; true if the store changed.
    async fn load_folder(&self, path: &Path) -> anyhow::Result<bool> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let lt: LanguageTitle = name.parse().with_context(|| format!("folder name {name:?}"))?;
        let spec: FunctionSpec =
            serde_json::from_slice(&std::fs::read(path.join("function.json"))?).context("function.json")?;
        let entrypoint = spec
            .entrypoint
            .clone()
            .unwrap_or_else(|| lt.language().default_entrypoint().to_owned());
        let code = if lt.language() == Language::Pipeline {
            Submission::Source(String::new())
        } else {
            self.read_code(path, &entrypoint)?
        };
        // Crates are built in the background: start-up does not wait.
        let new = self.prepare(&lt, spec, code, false, None).await?;
        let stored = match self.get(lt.as_str()) {
            None => match self.store.create(new, Source::Bundled).await {
                Ok(stored) => stored,
                // Another replica registered it first, from the same folder.
                Err(StoreError::Conflict) => self.store.function(lt.as_str()).await?.context("vanished")?,
                Err(e) => return Err(e.into()),
            },
            Some(f) if f.source == Source::Bundled && changed(&f.current, &new) => {
                self.store.add_version(new, Source::Bundled, None).await?
            }
            Some(_) => return Ok(false),
        };
        self.remember(stored)?;
        Ok(true)
    }

    /// A bundled folder's code: a crate, a package or one file.
    fn read_code(&self, path: &Path, entrypoint: &str) -> anyhow::Result<Submission> {
        anyhow::ensure!(
            package::check_path(entrypoint).is_ok() && !entrypoint.contains(".."),
            "bad entrypoint {entrypoint:?}"
        );
        let code = if entrypoint == CRATE_ENTRYPOINT {
            Submission::Source(manifest::crate_code(&read_crate(path)?))
        } else {
            match package::read_folder(path, entrypoint, self.package_limits)? {
                Some(files) => Submission::Files(files),
                None => Submission::Source(
                    std::fs::read_to_string(path.join(entrypoint)).with_context(|| format!("reading {entrypoint}"))?,
                ),
            }
        };
        Ok(code)
    }
}

/// A crate folder's files: `Cargo.toml`, `Cargo.lock` if any, and
/// everything under `src/`.
fn read_crate(folder: &Path) -> anyhow::Result<CrateFiles> {
    let mut files = CrateFiles::new();
    for name in ["Cargo.toml", "Cargo.lock"] {
        if folder.join(name).is_file() {
            files.insert(name.to_owned(), std::fs::read_to_string(folder.join(name))?);
        }
    }
    let mut pending = vec![folder.join("src")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(folder)?.to_string_lossy().into_owned();
                files.insert(relative, std::fs::read_to_string(&path)?);
            }
        }
    }
    Ok(files)
}

/// Whether `subject` manages a function owned by `owner` (`None`: bundled).
fn manages(subject: &Subject, owner: Option<&str>) -> bool {
    subject.has(ADMIN_FUNCTIONS) || owner.is_some_and(|owner| owner == subject.sub)
}

/// A stored version, ready to run.
fn version_from_stored(v: StoredVersion, owner: Option<String>) -> anyhow::Result<FunctionVersion> {
    let language_title: LanguageTitle = v
        .language_title
        .parse()
        .with_context(|| format!("stored Language-Title {:?}", v.language_title))?;
    let manifest: Manifest = serde_json::from_value(v.manifest).context("stored manifest")?;
    let mut version = FunctionVersion::new(language_title, v.version, manifest, v.code, v.code_hash, v.created_at)?;
    version.owner = owner;
    version.registration = Arc::from(v.registration);
    Ok(version)
}

/// Whether a bundled folder differs from the stored version (code or any
/// manifest field, examples included).
fn changed(current: &FunctionVersion, new: &NewVersion) -> bool {
    current.code_hash != new.code_hash || serde_json::to_value(&current.manifest).ok().as_ref() != Some(&new.manifest)
}
