//! The controller's database: SQLite in the data directory.
//!
//! SQLite because it is the most widely deployed embedded engine, survives power loss
//! (write-ahead log, `synchronous=FULL`), needs nothing installed (built in), and its
//! one-file databases are easy to back up and inspect with the `sqlite3` tool.
//!
//! The schema is versioned with `PRAGMA user_version`: each step of [`MIGRATIONS`]
//! moves a database one version up, in a transaction, so a newer `tandemd` opens an
//! older database; a database from a newer `tandemd` is refused, never altered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rusqlite::{Connection, MAIN_DB, OpenFlags, OptionalExtension, Transaction, params};
use tandem_api::{
    ClusterId, Group, NodeId, NodeName, Origin, ParticipantKind, SnapshotName, VolumeName,
};

use crate::blockfile::{BlockDevice, Mounted};
use crate::model::{
    Cluster, Model, NodeRow, Part, ParticipantRow, PoolRow, SnapshotRow, VolumeRow,
};

/// Schema steps; `MIGRATIONS[i]` upgrades version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: nodes, pools, groups, volumes and their participants.
    "CREATE TABLE cluster (
         one INTEGER PRIMARY KEY CHECK (one = 1),
         id TEXT NOT NULL,
         secret TEXT NOT NULL);
     CREATE TABLE nodes (
         name TEXT PRIMARY KEY,
         address TEXT NOT NULL,
         peer_address TEXT NOT NULL DEFAULT '');
     CREATE TABLE pools (
         node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
         name TEXT NOT NULL,
         kind TEXT NOT NULL,
         path TEXT NOT NULL,
         PRIMARY KEY (node, name));
     CREATE TABLE groups (
         name TEXT PRIMARY KEY,
         body TEXT NOT NULL);
     CREATE TABLE volumes (
         name TEXT PRIMARY KEY,
         id TEXT NOT NULL UNIQUE,
         size INTEGER NOT NULL,
         grp TEXT NOT NULL REFERENCES groups(name),
         replicas INTEGER NOT NULL);
     CREATE TABLE participants (
         volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
         node TEXT NOT NULL REFERENCES nodes(name),
         node_id INTEGER NOT NULL,
         kind TEXT NOT NULL,
         pool TEXT,
         attached INTEGER NOT NULL,
         fresh INTEGER NOT NULL,
         PRIMARY KEY (volume, node),
         UNIQUE (volume, node_id));
     INSERT INTO groups VALUES ('default', '{\"name\":\"default\"}');",
    // 2: key-value stores.
    "CREATE TABLE kv (
         store TEXT NOT NULL,
         key TEXT NOT NULL,
         value TEXT NOT NULL,
         PRIMARY KEY (store, key));",
    // 3: snapshots; `replicas` is a JSON list of the nodes holding one.
    "CREATE TABLE snapshots (
         volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
         name TEXT NOT NULL,
         created INTEGER NOT NULL,
         size INTEGER NOT NULL,
         replicas TEXT NOT NULL,
         PRIMARY KEY (volume, name));",
    // 4: a clone's origin, VOLUME@SNAPSHOT.
    "ALTER TABLE volumes ADD COLUMN origin TEXT;",
    // 5: replicas the controller removed from the model and a node still has to drop:
    // a node's volume is deleted only on such a record, never for being unknown.
    "CREATE TABLE deletions (
         node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
         volume TEXT NOT NULL,
         id TEXT NOT NULL,
         PRIMARY KEY (node, volume, id));",
    // 6: the controller epoch, raised by every controller that starts on the database.
    "ALTER TABLE cluster ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;",
    // 7: a volume's revision, raised with every change (nodes refuse older specs).
    "ALTER TABLE volumes ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path} has schema version {found}, newer than this tandemd knows ({known})")]
    Newer {
        path: String,
        found: u32,
        known: u32,
    },
    #[error("database content is invalid: {0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database's volume cannot be used: {0}")]
    Device(String),
    #[error("this controller no longer writes its database: {0}")]
    Fenced(String),
}

pub struct Store {
    db: Connection,
    /// The device a database on the system volume is kept on; dropped after `db`.
    mounted: Option<Mounted>,
    /// Why writes are refused, once they are.
    fenced: Option<String>,
}

fn invalid(e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(e.to_string())
}

fn kind_name(kind: ParticipantKind) -> &'static str {
    match kind {
        ParticipantKind::Diskful => "diskful",
        ParticipantKind::Diskless => "diskless",
        ParticipantKind::Tiebreaker => "tiebreaker",
    }
}

fn parse_kind(s: &str) -> Result<ParticipantKind, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(invalid)
}

impl Store {
    /// Opens (creating if missing) and upgrades the database file at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        Store::prepare(db, None, &path.display().to_string(), None)
    }

    /// Opens the database kept on a block device (the cluster's system volume, see
    /// [`crate::blockfile`]), creating it for cluster `cluster` on a device that holds
    /// none. A database of another cluster is refused.
    pub fn open_on(
        device: std::sync::Arc<dyn BlockDevice>,
        cluster: ClusterId,
    ) -> Result<Store, StoreError> {
        let mounted = Mounted::new(device).map_err(|e| StoreError::Device(e.to_string()))?;
        let db = Connection::open_with_flags(
            mounted.uri(),
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // One process has the database, the volume's Primary: exclusive locking, set
        // before the log is first used, keeps the log's index in its memory; temporary
        // tables stay in memory too (the volume holds only the three files). A commit
        // is one sync of the log; after a checkpoint the log is cut back to 8 MiB.
        db.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "journal_size_limit", 8 << 20)?;
        db.pragma_update(None, "temp_store", "MEMORY")?;
        let store = Store::prepare(db, Some(mounted), "the system volume", Some(cluster))?;
        let found = store.cluster()?.map(|c| c.id);
        if found != Some(cluster) {
            return Err(StoreError::Invalid(format!(
                "the system volume holds the database of cluster {}, not of cluster {cluster}",
                found.map_or_else(|| "?".into(), |id| id.to_string())
            )));
        }
        Ok(store)
    }

    /// Settings, schema upgrades and the cluster row (`cluster`'s id, or a new one)
    /// of a database just opened.
    fn prepare(
        db: Connection,
        mounted: Option<Mounted>,
        label: &str,
        cluster: Option<ClusterId>,
    ) -> Result<Store, StoreError> {
        db.pragma_update(None, "synchronous", "FULL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store {
            db,
            mounted,
            fenced: None,
        };
        store.migrate(label)?;
        if store.cluster()?.is_none() {
            let cluster = Cluster {
                id: cluster.unwrap_or_else(ClusterId::random),
                secret: random_secret(),
                epoch: 0,
            };
            store.db.execute(
                "INSERT INTO cluster (one, id, secret) VALUES (1, ?1, ?2)",
                params![cluster.id.to_string(), cluster.secret],
            )?;
            tracing::info!(cluster = %cluster.id, "new cluster");
        }
        Ok(store)
    }

    /// Moves the schema up to this tandemd's version, one step per transaction.
    fn migrate(&mut self, label: &str) -> Result<(), StoreError> {
        let found: u32 = self
            .db
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as u32;
        if found > known {
            return Err(StoreError::Newer {
                path: label.to_owned(),
                found,
                known,
            });
        }
        for (version, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.db.transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", version as u32 + 1)?;
            tx.commit()?;
            tracing::info!(
                database = label,
                version = version + 1,
                "controller database schema upgraded"
            );
        }
        Ok(())
    }

    /// Replaces the whole content of this database with that of the database file at
    /// `path` (a backup), which must belong to the same cluster; upgraded if older.
    pub fn import(&mut self, path: &Path) -> Result<(), StoreError> {
        self.check_fence()?;
        let theirs = Some(Store::cluster_of(path)?);
        let ours = self.cluster()?.map(|c| c.id);
        if theirs != ours {
            return Err(StoreError::Invalid(format!(
                "{} is a database of cluster {}, this one is of cluster {}",
                path.display(),
                theirs.map_or_else(|| "?".into(), |id| id.to_string()),
                ours.map_or_else(|| "?".into(), |id| id.to_string()),
            )));
        }
        self.db
            .restore(MAIN_DB, path, None::<fn(rusqlite::backup::Progress)>)?;
        self.migrate(&path.display().to_string())?;
        // The nodes may hold specs changed since the backup, with higher revisions than
        // it records: every volume gets one above them (the time in milliseconds, far
        // above the counts of changes), so the nodes take the restored specs.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.db
            .execute("UPDATE volumes SET revision = max(revision + 1, ?1)", [now])?;
        Ok(())
    }

    /// The cluster of a database file, without changing it.
    pub fn cluster_of(path: &Path) -> Result<ClusterId, StoreError> {
        Store::validate(path)?;
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let id: String = db.query_row("SELECT id FROM cluster", [], |r| r.get(0))?;
        id.parse().map_err(invalid)
    }

    /// Refuses every later write, with `why`: a controller that lost its database
    /// volume's quorum, or that was stopped, must not write (another may have started).
    pub fn fence(&mut self, why: &str) {
        self.fenced = Some(why.to_owned());
        if let Some(mounted) = &self.mounted {
            mounted.fence(why);
        }
    }

    fn check_fence(&self) -> Result<(), StoreError> {
        match &self.fenced {
            Some(why) => Err(StoreError::Fenced(why.clone())),
            None => Ok(()),
        }
    }

    /// Writes a consistent copy of the database to `path` (a new file in the local file
    /// system) while it is in use: SQLite's online backup.
    pub fn backup_to(&self, path: &Path) -> Result<(), StoreError> {
        self.db
            .backup(MAIN_DB, path, None::<fn(rusqlite::backup::Progress)>)?;
        Ok(())
    }

    /// Checks a database file as a controller would start from it: it opens, passes
    /// SQLite's `integrity_check`, has a schema this tandemd knows and a cluster row.
    /// Its schema version, and the volumes it records.
    pub fn validate(path: &Path) -> Result<(u32, usize), StoreError> {
        let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(invalid(format!("integrity_check: {check}")));
        }
        let version: u32 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as u32;
        if version == 0 || version > known {
            return Err(invalid(format!(
                "schema version {version}; this tandemd knows 1 to {known}"
            )));
        }
        let clusters: i64 = db.query_row("SELECT count(*) FROM cluster", [], |r| r.get(0))?;
        if clusters != 1 {
            return Err(invalid("no cluster row"));
        }
        // The operators' volumes: the system volume is the database's own.
        let volumes: i64 = db.query_row(
            "SELECT count(*) FROM volumes WHERE name != ?1",
            [crate::system::SYSTEM_VOLUME],
            |r| r.get(0),
        )?;
        Ok((version, volumes as usize))
    }

    fn cluster(&self) -> Result<Option<Cluster>, StoreError> {
        self.db
            .query_row("SELECT id, secret, epoch FROM cluster", [], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()?
            .map(|(id, secret, epoch)| {
                Ok(Cluster {
                    id: id.parse().map_err(invalid)?,
                    secret,
                    epoch: epoch as u64,
                })
            })
            .transpose()
    }

    /// Raises the controller epoch for a controller starting on this database: to the
    /// current time in milliseconds, or one more than before if that is not more. Time
    /// puts a controller started from a restored (older) database above the ones before
    /// it, assuming the hosts' clocks agree to better than the time between takeovers.
    pub fn raise_epoch(&mut self) -> Result<u64, StoreError> {
        self.check_fence()?;
        let old: i64 = self
            .db
            .query_row("SELECT epoch FROM cluster", [], |r| r.get(0))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let epoch = now.max(old + 1);
        self.db.execute("UPDATE cluster SET epoch = ?1", [epoch])?;
        Ok(epoch as u64)
    }

    /// Reads the whole model.
    pub fn load(&self) -> Result<Model, StoreError> {
        let cluster = self
            .cluster()?
            .ok_or_else(|| invalid("the cluster row is missing"))?;
        let mut nodes = BTreeMap::new();
        let mut q = self
            .db
            .prepare("SELECT name, address, peer_address FROM nodes")?;
        for row in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))? {
            let (name, address, peer_address) = row?;
            nodes.insert(
                name.parse().map_err(invalid)?,
                NodeRow {
                    address,
                    peer_address,
                },
            );
        }
        let mut pools = BTreeMap::new();
        let mut q = self
            .db
            .prepare("SELECT node, name, kind, path FROM pools")?;
        for row in q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
            ))
        })? {
            let (node, name, kind, path) = row?;
            pools.insert(
                (
                    node.parse().map_err(invalid)?,
                    name.parse().map_err(invalid)?,
                ),
                PoolRow { kind, path },
            );
        }
        let mut groups = BTreeMap::new();
        let mut q = self.db.prepare("SELECT body FROM groups")?;
        for row in q.query_map([], |r| r.get::<_, String>(0))? {
            let group: Group = serde_json::from_str(&row?).map_err(invalid)?;
            groups.insert(group.name.clone(), group);
        }
        let mut volumes = BTreeMap::new();
        let mut q = self
            .db
            .prepare("SELECT name, id, size, grp, replicas, origin, revision FROM volumes")?;
        for row in q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u8>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })? {
            let (name, id, size, group, replicas, origin, revision) = row?;
            let origin = origin
                .map(|o| {
                    let (volume, snapshot) = o
                        .split_once('@')
                        .ok_or_else(|| invalid(format!("origin {o}")))?;
                    Ok::<_, StoreError>(Origin {
                        volume: volume.parse().map_err(invalid)?,
                        snapshot: snapshot.parse().map_err(invalid)?,
                    })
                })
                .transpose()?;
            volumes.insert(
                name.parse::<VolumeName>().map_err(invalid)?,
                VolumeRow {
                    id: id.parse().map_err(invalid)?,
                    revision: revision as u64,
                    size: size as u64,
                    group: group.parse().map_err(invalid)?,
                    replicas,
                    participants: Vec::new(),
                    origin,
                },
            );
        }
        let mut q = self.db.prepare(
            "SELECT volume, node, node_id, kind, pool, attached, fresh FROM participants
             ORDER BY volume, node_id",
        )?;
        for row in q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u8>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, bool>(6)?,
            ))
        })? {
            let (volume, node, node_id, kind, pool, attached, fresh) = row?;
            let volume: VolumeName = volume.parse().map_err(invalid)?;
            let row = ParticipantRow {
                node: node.parse().map_err(invalid)?,
                node_id: NodeId::new(node_id)
                    .ok_or_else(|| invalid(format!("node id {node_id}")))?,
                kind: parse_kind(&kind)?,
                pool: pool.map(|p| p.parse()).transpose().map_err(invalid)?,
                attached,
                fresh,
            };
            volumes
                .get_mut(&volume)
                .ok_or_else(|| invalid(format!("participant of unknown volume {volume}")))?
                .participants
                .push(row);
        }
        let mut kv = BTreeMap::new();
        let mut q = self.db.prepare("SELECT store, key, value FROM kv")?;
        for row in q.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })? {
            let (store, key, value) = row?;
            kv.insert((store.parse().map_err(invalid)?, key), value);
        }
        let mut snapshots = BTreeMap::new();
        let mut q = self
            .db
            .prepare("SELECT volume, name, created, size, replicas FROM snapshots")?;
        for row in q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })? {
            let (volume, name, created, size, replicas) = row?;
            snapshots.insert(
                (
                    volume.parse().map_err(invalid)?,
                    name.parse().map_err(invalid)?,
                ),
                SnapshotRow {
                    created: created as u64,
                    size: size as u64,
                    replicas: serde_json::from_str(&replicas).map_err(invalid)?,
                },
            );
        }
        let mut deletions = BTreeSet::new();
        let mut q = self.db.prepare("SELECT node, volume, id FROM deletions")?;
        for row in q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })? {
            let (node, volume, id) = row?;
            deletions.insert(Part {
                node: node.parse().map_err(invalid)?,
                volume: volume.parse().map_err(invalid)?,
                id: id.parse().map_err(invalid)?,
            });
        }
        Ok(Model {
            cluster,
            nodes,
            pools,
            groups,
            volumes,
            kv,
            snapshots,
            deletions,
        })
    }

    /// Runs `f` in one transaction: all of its changes land, or none.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&Writer<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.check_fence()?;
        let tx = self.db.transaction()?;
        let out = f(&Writer { tx: &tx })?;
        tx.commit()?;
        Ok(out)
    }
}

/// Changes inside one transaction.
pub struct Writer<'a> {
    tx: &'a Transaction<'a>,
}

impl Writer<'_> {
    pub fn node(&self, name: &NodeName, row: &NodeRow) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO nodes (name, address, peer_address) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET address = ?2, peer_address = ?3",
            params![name.as_str(), row.address, row.peer_address],
        )?;
        Ok(())
    }

    pub fn deletion(&self, d: &Part) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO deletions (node, volume, id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![d.node.as_str(), d.volume.as_str(), d.id.to_string()],
        )?;
        Ok(())
    }

    pub fn drop_deletion(&self, d: &Part) -> Result<(), StoreError> {
        self.tx.execute(
            "DELETE FROM deletions WHERE node = ?1 AND volume = ?2 AND id = ?3",
            params![d.node.as_str(), d.volume.as_str(), d.id.to_string()],
        )?;
        Ok(())
    }

    pub fn delete_node(&self, name: &NodeName) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM participants WHERE node = ?1", [name.as_str()])?;
        self.tx
            .execute("DELETE FROM nodes WHERE name = ?1", [name.as_str()])?;
        Ok(())
    }

    /// Replaces the pools recorded for a node.
    pub fn pools(
        &self,
        node: &NodeName,
        pools: &[(tandem_api::PoolName, PoolRow)],
    ) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM pools WHERE node = ?1", [node.as_str()])?;
        for (name, p) in pools {
            self.tx.execute(
                "INSERT INTO pools (node, name, kind, path) VALUES (?1, ?2, ?3, ?4)",
                params![node.as_str(), name.as_str(), p.kind, p.path],
            )?;
        }
        Ok(())
    }

    pub fn group(&self, group: &Group) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO groups (name, body) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET body = ?2",
            params![
                group.name.as_str(),
                serde_json::to_string(group).expect("serialisable")
            ],
        )?;
        Ok(())
    }

    pub fn delete_group(&self, name: &tandem_api::GroupName) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM groups WHERE name = ?1", [name.as_str()])?;
        Ok(())
    }

    /// Writes a volume and replaces its participants.
    pub fn volume(&self, name: &VolumeName, v: &VolumeRow) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO volumes (name, id, size, grp, replicas, origin, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (name) DO UPDATE SET size = ?3, grp = ?4, replicas = ?5, revision = ?7",
            params![
                name.as_str(),
                v.id.to_string(),
                v.size as i64,
                v.group.as_str(),
                v.replicas,
                v.origin.as_ref().map(|o| o.to_string()),
                v.revision as i64
            ],
        )?;
        self.tx.execute(
            "DELETE FROM participants WHERE volume = ?1",
            [name.as_str()],
        )?;
        for p in &v.participants {
            self.tx.execute(
                "INSERT INTO participants (volume, node, node_id, kind, pool, attached, fresh)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    name.as_str(),
                    p.node.as_str(),
                    u8::from(p.node_id),
                    kind_name(p.kind),
                    p.pool.as_ref().map(|p| p.as_str()),
                    p.attached,
                    p.fresh
                ],
            )?;
        }
        Ok(())
    }

    pub fn revision(&self, name: &VolumeName, revision: u64) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE volumes SET revision = ?2 WHERE name = ?1",
            params![name.as_str(), revision as i64],
        )?;
        Ok(())
    }

    pub fn delete_volume(&self, name: &VolumeName) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM volumes WHERE name = ?1", [name.as_str()])?;
        Ok(())
    }

    pub fn snapshot(
        &self,
        volume: &VolumeName,
        name: &SnapshotName,
        row: &SnapshotRow,
    ) -> Result<(), StoreError> {
        let replicas = serde_json::to_string(&row.replicas).expect("names serialise");
        self.tx.execute(
            "INSERT INTO snapshots (volume, name, created, size, replicas) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (volume, name) DO UPDATE SET replicas = ?5",
            params![
                volume.as_str(),
                name.as_str(),
                row.created as i64,
                row.size as i64,
                replicas
            ],
        )?;
        Ok(())
    }

    pub fn delete_snapshot(
        &self,
        volume: &VolumeName,
        name: &SnapshotName,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "DELETE FROM snapshots WHERE volume = ?1 AND name = ?2",
            [volume.as_str(), name.as_str()],
        )?;
        Ok(())
    }

    pub fn kv_set(
        &self,
        store: &tandem_api::StoreName,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO kv (store, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (store, key) DO UPDATE SET value = ?3",
            params![store.as_str(), key, value],
        )?;
        Ok(())
    }

    pub fn kv_delete(&self, store: &tandem_api::StoreName, key: &str) -> Result<(), StoreError> {
        self.tx.execute(
            "DELETE FROM kv WHERE store = ?1 AND key = ?2",
            params![store.as_str(), key],
        )?;
        Ok(())
    }
}

/// 32 random bytes, hex: the cluster secret.
fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(node: &str) -> VolumeRow {
        VolumeRow {
            id: tandem_api::VolumeId::random(),
            revision: 3,
            size: 1 << 30,
            group: "default".parse().unwrap(),
            replicas: 1,
            participants: vec![ParticipantRow {
                node: node.parse().unwrap(),
                node_id: NodeId::new(0).unwrap(),
                kind: ParticipantKind::Diskful,
                pool: Some("default".parse().unwrap()),
                attached: false,
                fresh: false,
            }],
            origin: None,
        }
    }

    fn kv(store: &Store) -> BTreeMap<String, String> {
        (store.load().unwrap().kv.into_iter())
            .map(|((_, k), v)| (k, v))
            .collect()
    }

    fn set(store: &mut Store, keys: std::ops::Range<u32>) -> Result<(), StoreError> {
        let sr: tandem_api::StoreName = "sr".parse().unwrap();
        store.write(|w| {
            keys.clone()
                .try_for_each(|i| w.kv_set(&sr, &format!("key{i:04}"), &"v".repeat(300)))
        })
    }

    /// Runs `step` on the database `prepare` makes, on a device that crashes after
    /// each of the operations `step` takes in turn, keeping none, all, or alternate
    /// ones of the writes not yet flushed (the log's pages without the superblock
    /// that gives its new length, and the reverse). After each crash the database
    /// must open and pass `integrity_check`; `check` sees it, with whether `step`
    /// returned success and where the crash came. How many operations `step` takes.
    fn crash_everywhere(
        prepare: impl Fn(&std::sync::Arc<crate::blockfile::tests::MemDevice>) -> Store,
        step: impl Fn(&mut Store) -> Result<(), StoreError>,
        check: impl Fn(&Store, bool, u64),
    ) -> u64 {
        use crate::blockfile::tests::MemDevice;
        let device = || MemDevice::new(crate::blockfile::MIN_DEVICE as usize);
        let probe = device();
        let mut store = prepare(&probe);
        probe.crash_after(u64::MAX - 1);
        step(&mut store).unwrap();
        let ops = u64::MAX - 1 - probe.left();
        drop(store);
        for crash_at in 0..=ops {
            for keep in [
                |_: usize| false,
                |_: usize| true,
                |i: usize| i % 2 == 0,
                |i: usize| i % 2 == 1,
            ] {
                let dev = device();
                let mut store = prepare(&dev);
                dev.crash_after(crash_at);
                let done = step(&mut store).is_ok();
                drop(store);
                let store = Store::open_on(dev.after_crash(keep), store_cluster())
                    .unwrap_or_else(|e| panic!("crash after {crash_at} operations: {e}"));
                let integrity: String = store
                    .db
                    .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(integrity, "ok", "crash after {crash_at} operations");
                check(&store, done, crash_at);
            }
        }
        ops
    }

    /// The one cluster of the crash tests' databases.
    fn store_cluster() -> ClusterId {
        static CLUSTER: std::sync::OnceLock<ClusterId> = std::sync::OnceLock::new();
        *CLUSTER.get_or_init(ClusterId::random)
    }

    #[test]
    fn a_database_on_a_device_survives_a_crash_at_every_write() {
        // A transaction of 4000 keys: over 1 MiB of log, so the log's length in the
        // superblock changes too.
        let ops = crash_everywhere(
            |dev| {
                let mut store = Store::open_on(dev.clone(), store_cluster()).unwrap();
                set(&mut store, 0..100).unwrap();
                store
            },
            |store| set(store, 100..4100),
            |store, acked, crash_at| {
                let keys = kv(store).len();
                assert!(
                    keys == 100 || keys == 4100,
                    "crash after {crash_at}: {keys} keys, a transaction applied in part"
                );
                if acked {
                    assert_eq!(
                        keys, 4100,
                        "crash after {crash_at}: a committed transaction lost"
                    );
                }
            },
        );
        assert!(
            ops >= 4,
            "the commit writes runs of the log, the superblock, then flushes ({ops})"
        );
    }

    #[test]
    fn a_checkpoint_cut_by_a_crash_loses_nothing_committed() {
        let ops = crash_everywhere(
            |dev| {
                let mut store = Store::open_on(dev.clone(), store_cluster()).unwrap();
                set(&mut store, 0..100).unwrap();
                set(&mut store, 100..200).unwrap();
                store
            },
            |store| Ok(store.db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?),
            |store, _, crash_at| {
                assert_eq!(kv(store).len(), 200, "crash after {crash_at} operations");
            },
        );
        assert!(
            ops >= 2,
            "a checkpoint writes the database, then flushes ({ops})"
        );
    }

    #[test]
    fn a_backup_is_imported_onto_a_device_of_its_cluster_only() {
        use crate::blockfile::tests::MemDevice;
        let dir = tempfile::tempdir().unwrap();
        let dev = MemDevice::new(crate::blockfile::MIN_DEVICE as usize);
        let cluster = ClusterId::random();
        let mut store = Store::open_on(dev.clone(), cluster).unwrap();
        set(&mut store, 0..10).unwrap();
        let backup = dir.path().join("backup.db");
        store.backup_to(&backup).unwrap();
        assert_eq!(Store::cluster_of(&backup).unwrap(), cluster);
        set(&mut store, 10..20).unwrap();
        store.import(&backup).unwrap();
        assert_eq!(kv(&store).len(), 10);
        drop(store);
        assert_eq!(kv(&Store::open_on(dev.clone(), cluster).unwrap()).len(), 10);
        // Another cluster's device, or another cluster's backup: refused.
        assert!(Store::open_on(dev.clone(), ClusterId::random()).is_err());
        let other = MemDevice::new(crate::blockfile::MIN_DEVICE as usize);
        let mut theirs = Store::open_on(other, ClusterId::random()).unwrap();
        let e = theirs.import(&backup).unwrap_err().to_string();
        assert!(e.contains("is a database of cluster"), "{e}");
    }

    #[test]
    fn a_fenced_store_writes_nothing() {
        let dev = crate::blockfile::tests::MemDevice::new(crate::blockfile::MIN_DEVICE as usize);
        let cluster = ClusterId::random();
        let mut store = Store::open_on(dev.clone(), cluster).unwrap();
        store.fence("quorum lost");
        let e = set(&mut store, 0..1).unwrap_err().to_string();
        assert!(e.contains("quorum lost"), "{e}");
        assert!(store.raise_epoch().is_err());
        drop(store);
        assert!(kv(&Store::open_on(dev, cluster).unwrap()).is_empty());
    }

    #[test]
    fn a_stopped_controllers_database_closed_late_leaves_its_successors_commits() {
        // A controller stops (its node lost the system volume) while its threads still
        // hold the database; it is closed only after the next controller, elsewhere,
        // opened it and committed. Closing checkpoints the log as the old one knew it
        // and deletes the log: none of that may reach the volume any more, or the new
        // controller's commits are gone when the database is next opened.
        let dev = crate::blockfile::tests::MemDevice::new(crate::blockfile::MIN_DEVICE as usize);
        let cluster = ClusterId::random();
        let mut old = Store::open_on(dev.clone(), cluster).unwrap();
        set(&mut old, 0..10).unwrap();
        old.fence("node n1 lost the quorum of the system volume");
        let mut new = Store::open_on(dev.clone(), cluster).unwrap();
        set(&mut new, 10..20).unwrap();
        drop(old);
        // The new controller's node dies: its database is never closed.
        std::mem::forget(new);
        assert_eq!(kv(&Store::open_on(dev, cluster).unwrap()).len(), 20);
    }

    #[test]
    fn objects_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.db");
        let mut store = Store::open(&path).unwrap();
        let first = store.load().unwrap();
        assert_eq!(first.cluster.secret.len(), 64);
        assert!(first.groups.contains_key(&"default".parse().unwrap()));
        let n1: NodeName = "n1".parse().unwrap();
        let vm: VolumeName = "vm1".parse().unwrap();
        let row = volume("n1");
        store
            .write(|w| {
                w.node(
                    &n1,
                    &NodeRow {
                        address: "127.0.0.1:3370".into(),
                        peer_address: "127.0.0.1:7700".into(),
                    },
                )?;
                w.volume(&vm, &row)?;
                w.kv_set(&"sr".parse().unwrap(), "vdi/a", "x")
            })
            .unwrap();
        drop(store);
        let model = Store::open(&path).unwrap().load().unwrap();
        assert_eq!(model.cluster, first.cluster);
        assert_eq!(model.volumes[&vm], row);
        assert_eq!(model.nodes[&n1].peer_address, "127.0.0.1:7700");
        assert_eq!(model.kv.len(), 1);
    }

    #[test]
    fn an_older_schema_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.db");
        {
            // A database as the first release wrote it: schema 1, with a volume.
            let db = Connection::open(&path).unwrap();
            db.execute_batch(MIGRATIONS[0]).unwrap();
            db.pragma_update(None, "user_version", 1).unwrap();
            db.execute(
                "INSERT INTO cluster VALUES (1, '00112233445566778899aabbccddeeff', 'old-secret')",
                [],
            )
            .unwrap();
            db.execute("INSERT INTO nodes VALUES ('n1', '127.0.0.1:3370', '')", [])
                .unwrap();
            db.execute(
                "INSERT INTO volumes VALUES ('vm1', 'ffeeddccbbaa99887766554433221100', 4096, 'default', 1)",
                [],
            )
            .unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        let model = store.load().unwrap();
        assert_eq!(model.cluster.secret, "old-secret");
        assert_eq!(model.volumes.len(), 1);
        store
            .write(|w| w.kv_set(&"sr".parse().unwrap(), "k", "v"))
            .unwrap();
        let version: u32 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as u32);
    }

    #[test]
    fn a_newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");
        let version: u32 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 99);
    }

    #[test]
    fn a_failed_transaction_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let vm: VolumeName = "vm1".parse().unwrap();
        // The participant's node does not exist: the foreign key fails the whole write.
        let err = store.write(|w| w.volume(&vm, &volume("ghost")));
        assert!(err.is_err());
        assert!(store.load().unwrap().volumes.is_empty());
    }
}
