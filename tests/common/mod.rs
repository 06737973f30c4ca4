//! Test harness: one throwaway PostgreSQL per test binary (stopped when the binary
//! exits), a synthetic Hydra template database, and helpers that drive the real binary.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use hydra_upgrade::db::Db;
use hydra_upgrade::hydra_schema;
use hydra_upgrade::pg_cluster::{PgCluster, SUPERUSER};
use hydra_upgrade::synth;

pub const BIN: &str = env!("CARGO_BIN_EXE_hydra-upgrade");

/// The template's shape: several projects, shared jobset names, large and small jobsets.
pub const SPEC: synth::Spec = synth::Spec {
    projects: 12,
    jobsets: 48,
    jobs: 1_500,
    builds: 12_000,
    seed: 7,
};

pub fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<&'static PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // wal_level=logical: tests/engine_slots.rs creates a logical replication slot.
        let c = PgCluster::start(&[
            "fsync=off",
            "full_page_writes=off",
            "max_connections=100",
            "wal_level=logical",
        ])
        .expect("starting the test PostgreSQL (see README: PostgreSQL server binaries are needed)");
        let c = c
            .share_until_exit(std::process::id())
            .expect("watching the test process");
        c.create_database("template_hydra57", None)
            .expect("template database");
        let mut db = c.connect("template_hydra57").expect("connect to template");
        synth::generate(&mut db, &SPEC).expect("synthetic data");
        c.create_database("template_empty", None)
            .expect("empty template");
        c
    })
}

/// A test database, connected through its DSN.
pub struct TestDb {
    pub name: String,
    pub dsn: String,
}

impl TestDb {
    pub fn connect(&self) -> Db {
        cluster()
            .connect(&self.name)
            .expect("connect to the test database")
    }

    pub fn query_i64(&self, sql: &str) -> i64 {
        self.connect()
            .client()
            .query_one(sql, &[])
            .expect(sql)
            .get(0)
    }

    pub fn query_string(&self, sql: &str) -> String {
        self.connect()
            .client()
            .query_one(sql, &[])
            .expect(sql)
            .get(0)
    }

    /// Until no other client session is connected to this database: a tool killed
    /// outright leaves its session on the server until the statement it was running
    /// ends (a COMMIT among them), so what it committed is only known then.
    pub fn wait_until_no_other_session(&self) {
        wait_for(
            &format!("the other sessions to leave {}", self.name),
            || {
                self.query_i64(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND backend_type = 'client backend'",
                ) == 0
            },
        );
    }

    pub fn exec(&self, sql: &str) {
        self.connect().client().batch_execute(sql).expect(sql);
    }

    pub fn version(&self) -> i64 {
        self.query_i64("SELECT version::bigint FROM SchemaVersion")
    }

    /// finalize's helper `CHECK (jobset_id IS NOT NULL)` constraints added and not yet
    /// validated (as after its `NOT VALID` step, before its `VALIDATE`).
    pub fn unvalidated_helper_checks(&self) -> i64 {
        self.query_i64(
            "SELECT count(*) FROM pg_constraint
              WHERE conname LIKE 'hydra_upgrade_%' AND NOT convalidated",
        )
    }

    /// Bring the schema to `version` as hydra-init would.
    pub fn upgrade_to(&self, version: i32) {
        hydra_schema::apply_steps(&mut self.connect(), version).expect("applying schema steps");
    }

    /// A digest of every Jobs and Builds row without jobset_id: proves no other column
    /// changed.
    pub fn digest_without_jobset_id(&self) -> String {
        self.query_string(
            "SELECT md5((SELECT string_agg((to_jsonb(b) - 'jobset_id')::text, '|' ORDER BY id) FROM builds b)
                     || (SELECT string_agg((to_jsonb(j) - 'jobset_id')::text, '|' ORDER BY project, jobset, name) FROM jobs j))",
        )
    }

    /// Rows whose jobset_id is not their own jobset's id (independent of the tool's SQL).
    pub fn wrong_or_null(&self) -> i64 {
        self.query_i64(
            "SELECT (SELECT count(*) FROM builds b WHERE b.jobset_id IS DISTINCT FROM
                        (SELECT id FROM jobsets WHERE project = b.project AND name = b.jobset))
                  + (SELECT count(*) FROM jobs j WHERE j.jobset_id IS DISTINCT FROM
                        (SELECT id FROM jobsets WHERE project = j.project AND name = j.jobset))",
        )
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn new_db(template: &str) -> TestDb {
    let c = cluster();
    let name = format!(
        "t{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    c.create_database(&name, Some(template))
        .expect("create test database");
    TestDb {
        dsn: c.dsn_string(&name, SUPERUSER),
        name,
    }
}

/// A synthetic Hydra at `version` (57..=65), jobset_id NULL everywhere it exists.
pub fn hydra_at(version: i32) -> TestDb {
    let db = new_db("template_hydra57");
    db.upgrade_to(version);
    db
}

pub fn empty_db() -> TestDb {
    new_db("template_empty")
}

/// Hand `db` and its tables to the role `hu_owner` (created if need be), as Hydra's own
/// role on NixOS has them: owner, no superuser, no monitoring role. Its DSN.
pub fn owned_by_hydra_role(db: &TestDb) -> String {
    db.exec(&format!(
        "DO $$ BEGIN CREATE ROLE hu_owner LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         ALTER DATABASE {} OWNER TO hu_owner;
         DO $$ DECLARE t text; BEGIN
           FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
             EXECUTE format('ALTER TABLE %I OWNER TO hu_owner', t);
           END LOOP;
         END $$",
        db.name
    ));
    cluster().dsn_string(&db.name, "hu_owner")
}

/// One table's part of a backfill report.
pub fn table_report<'a>(report: &'a serde_json::Value, table: &str) -> &'a serde_json::Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .unwrap_or_else(|| panic!("no {table} in {report}"))
}

/// SQL that fills `jobset_id` of the Builds rows (`b`) matching `condition` at once, as a
/// partly done or finished backfill leaves them.
pub fn fill_builds_where(condition: &str) -> String {
    format!(
        "UPDATE builds b SET jobset_id = js.id FROM jobsets js
          WHERE js.project = b.project AND js.name = b.jobset AND ({condition})"
    )
}

/// A table's storage options, e.g. `{autovacuum_analyze_threshold=2000000000}`, or "".
pub fn reloptions(db: &TestDb, table: &str) -> String {
    db.query_string(&format!(
        "SELECT coalesce(reloptions::text, '') FROM pg_class WHERE oid = '{table}'::regclass"
    ))
}

/// The session settings our commands change on the connection they are given
/// (`lock_timeout`, `statement_timeout`, `synchronous_commit`), as `SHOW` gives them.
pub fn session_settings(conn: &mut Db) -> Vec<String> {
    ["lock_timeout", "statement_timeout", "synchronous_commit"]
        .iter()
        .map(|s| {
            conn.client()
                .query_one(&format!("SHOW {s}"), &[])
                .unwrap()
                .get(0)
        })
        .collect()
}

/// Cancel (`pg_cancel_backend`) the sessions of `db` that wait for a lock, as an admin
/// would, once there is one: waits for `what` to start waiting.
pub fn cancel_lock_waiters(db: &TestDb, what: &str) {
    let mut admin = db.connect();
    wait_for(&format!("{what} to wait for a lock"), || {
        admin
            .client()
            .query_one(
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0
    });
}

/// How long a test waits for another process to do what it waits for before it fails:
/// far longer than any of them takes, so only a fault reaches it.
pub const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Look every 20 ms until `cond` holds; fail, naming `what`, after [`WAIT_LIMIT`].
#[track_caller]
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for_value(what, || cond().then_some(()))
}

/// Look every 20 ms until `probe` finds a value and return it; fail, naming `what`,
/// after [`WAIT_LIMIT`].
#[track_caller]
pub fn wait_for_value<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(start.elapsed() < WAIT_LIMIT, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a backfill has committed a row of Builds: its walk of Builds has begun.
pub const BUILDS_STARTED: &str = "SELECT EXISTS (SELECT FROM builds WHERE jobset_id IS NOT NULL)";

/// [`BUILDS_STARTED`] in `db`.
pub fn builds_started(db: &TestDb) -> bool {
    db.connect()
        .client()
        .query_one(BUILDS_STARTED, &[])
        .expect(BUILDS_STARTED)
        .get(0)
}

/// `haystack` (a command's stdout or stderr) contains `needle`; if not, the failure shows
/// all of it.
#[track_caller]
pub fn assert_contains(haystack: &str, needle: &str) {
    assert!(
        haystack.contains(needle),
        "{needle:?} not found in:\n{haystack}"
    );
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// With `--json`: the events (every line but the last) and the final document (the
    /// last line).
    pub fn json_lines(&self) -> (Vec<serde_json::Value>, serde_json::Value) {
        let mut lines: Vec<serde_json::Value> = self
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", self.stdout))
            })
            .collect();
        let last = lines
            .pop()
            .unwrap_or_else(|| panic!("no JSON output:\n{}", self.stderr));
        (lines, last)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit code {code}, got {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// `--json` output of backfill is JSON-lines events; the last line is the report.
pub fn last_json_document(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no final JSON document ({e}):\n{stdout}"))
}

/// The binary with these arguments, none of the environment that would point it at
/// another database or configuration, and its exit status left to the caller; output
/// goes where the caller sends it.
pub fn bare_command(args: &[&str]) -> duct::Expression {
    duct::cmd(BIN, args)
        .env_remove("HYDRA_DBI")
        .env_remove("PGPASSWORD")
        .env_remove("HYDRA_UPGRADE_CONFIG")
        .unchecked()
}

fn command(args: &[&str]) -> duct::Expression {
    bare_command(args).stdout_capture().stderr_capture()
}

/// Run the binary to the end.
pub fn run(args: &[&str]) -> Run {
    let out = command(args).run().expect("running hydra-upgrade");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run the binary against a test database.
pub fn run_on(db: &TestDb, args: &[&str]) -> Run {
    let mut full = vec!["--db", db.dsn.as_str()];
    full.extend_from_slice(args);
    run(&full)
}

/// Start the binary in the background with these arguments only (for interrupt tests).
pub fn spawn(args: &[&str]) -> duct::Handle {
    command(args).start().expect("starting hydra-upgrade")
}

pub fn spawn_on(db: &TestDb, args: &[&str]) -> duct::Handle {
    let mut full = vec!["--db".to_owned(), db.dsn.clone()];
    full.extend(args.iter().map(|s| s.to_string()));
    command(&full.iter().map(String::as_str).collect::<Vec<_>>())
        .start()
        .expect("starting hydra-upgrade")
}

/// A server setting as `pg_settings` shows it: in its unit (MB, s), as text.
pub fn server_setting(cluster: &PgCluster, name: &str) -> String {
    hydra_upgrade::wal_prepare::setting(&mut cluster.connect("postgres").unwrap(), name).unwrap()
}

/// Wait, up to 10 s, until a reload has brought `name` to `setting` (`pg_settings`' text).
pub fn wait_for_setting(cluster: &PgCluster, name: &str, setting: &str) {
    hydra_upgrade::wal_prepare::wait_for_settings(
        &mut cluster.connect("postgres").unwrap(),
        &[name],
        |_, now| now == setting,
    )
    .unwrap()
}

/// `ALTER SYSTEM SET` as an admin would, reloaded, and waited for until `name` shows
/// `in_effect` in `pg_settings`.
pub fn admin_sets(cluster: &PgCluster, name: &str, value: &str, in_effect: &str) {
    let mut db = cluster.connect("postgres").unwrap();
    hydra_upgrade::wal_prepare::alter_system(&mut db, name, Some(value)).unwrap();
    hydra_upgrade::wal_prepare::reload(&mut db).unwrap();
    wait_for_setting(cluster, name, in_effect);
}
