//! Hydra's schema as the upgrade sees it: the tables of schema 57 that the `jobset_id`
//! change touches (written from HYDRA-FACTS.md: columns, keys, foreign keys, triggers and
//! every Builds index, since they decide what an update costs), and the upgrade steps
//! 58..65 with `hydra-init`'s semantics (one transaction per step, `SchemaVersion` bumped
//! inside it).
//!
//! Used by the simulated host (rehearsals), the test fixtures and the benchmark.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::db::Db;

/// The highest step the hydra-migration package ships.
pub const MIGRATION_VERSION: i32 = 61;
/// The highest step of the jobset_id change (the final package ships these and later).
pub const FINAL_VERSION: i32 = 65;

/// Schema 57: the tables and objects that matter to the jobset_id change.
pub const BASE_SQL: &str = r#"
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE SchemaVersion (version integer NOT NULL);

CREATE TABLE Users (
    userName     text PRIMARY KEY NOT NULL,
    fullName     text,
    emailAddress text NOT NULL,
    password     text NOT NULL,
    emailOnError integer NOT NULL DEFAULT 0,
    type         text NOT NULL DEFAULT 'hydra',
    publicDashboard boolean NOT NULL DEFAULT false
);

CREATE TABLE Projects (
    name        text PRIMARY KEY NOT NULL,
    displayName text NOT NULL,
    description text,
    enabled     integer NOT NULL DEFAULT 1,
    hidden      integer NOT NULL DEFAULT 0,
    owner       text NOT NULL,
    homepage    text,
    declfile    text,
    decltype    text,
    declvalue   text,
    FOREIGN KEY (owner) REFERENCES Users(userName) ON UPDATE CASCADE
);

CREATE TABLE Jobsets (
    name             text NOT NULL,
    project          text NOT NULL,
    description      text,
    nixExprInput     text NOT NULL,
    nixExprPath      text NOT NULL,
    errorMsg         text,
    errorTime        integer,
    lastCheckedTime  integer,
    triggerTime      integer,
    enabled          integer NOT NULL DEFAULT 1,
    enableEmail      integer NOT NULL DEFAULT 1,
    hidden           integer NOT NULL DEFAULT 0,
    emailOverride    text NOT NULL,
    keepnr           integer NOT NULL DEFAULT 3,
    checkInterval    integer NOT NULL DEFAULT 300,
    schedulingShares integer NOT NULL DEFAULT 100,
    fetchErrorMsg    text,
    forceEval        boolean,
    startTime        integer,
    CHECK (schedulingShares > 0),
    PRIMARY KEY (project, name),
    FOREIGN KEY (project) REFERENCES Projects(name) ON DELETE CASCADE ON UPDATE CASCADE
);

CREATE FUNCTION notifyJobsetSharesChanged() RETURNS trigger AS $$
BEGIN NOTIFY jobset_shares_changed; RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER JobsetSharesChanged AFTER UPDATE ON Jobsets FOR EACH ROW
    WHEN (old.schedulingShares != new.schedulingShares)
    EXECUTE PROCEDURE notifyJobsetSharesChanged();

CREATE FUNCTION notifyJobsetsAdded() RETURNS trigger AS $$
BEGIN NOTIFY jobsets_added; RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER JobsetsAdded AFTER INSERT ON Jobsets
    FOR EACH STATEMENT EXECUTE PROCEDURE notifyJobsetsAdded();

CREATE FUNCTION notifyJobsetsDeleted() RETURNS trigger AS $$
BEGIN NOTIFY jobsets_deleted; RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER JobsetsDeleted AFTER DELETE ON Jobsets
    FOR EACH STATEMENT EXECUTE PROCEDURE notifyJobsetsDeleted();

CREATE FUNCTION notifyJobsetSchedulingChanged() RETURNS trigger AS $$
BEGIN NOTIFY jobset_scheduling_changed; RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER JobsetSchedulingChanged AFTER UPDATE ON Jobsets FOR EACH ROW
    WHEN (((old.triggerTime IS DISTINCT FROM new.triggerTime) AND (new.triggerTime IS NOT NULL))
          OR old.checkInterval != new.checkInterval OR old.enabled != new.enabled)
    EXECUTE PROCEDURE notifyJobsetSchedulingChanged();

CREATE TABLE JobsetEvals (
    id          serial PRIMARY KEY NOT NULL,
    project     text NOT NULL,
    jobset      text NOT NULL,
    errorMsg    text,
    errorTime   integer,
    timestamp   integer NOT NULL,
    checkoutTime integer NOT NULL,
    evalTime    integer NOT NULL,
    hasNewBuilds integer NOT NULL,
    hash        text NOT NULL,
    nrBuilds    integer,
    nrSucceeded integer,
    FOREIGN KEY (project) REFERENCES Projects(name) ON DELETE CASCADE ON UPDATE CASCADE,
    FOREIGN KEY (project, jobset) REFERENCES Jobsets(project, name) ON DELETE CASCADE ON UPDATE CASCADE
);

CREATE TABLE Jobs (
    project text NOT NULL,
    jobset  text NOT NULL,
    name    text NOT NULL,
    PRIMARY KEY (project, jobset, name),
    FOREIGN KEY (project) REFERENCES Projects(name) ON DELETE CASCADE ON UPDATE CASCADE,
    FOREIGN KEY (project, jobset) REFERENCES Jobsets(project, name) ON DELETE CASCADE ON UPDATE CASCADE
);

CREATE TABLE Builds (
    id            serial PRIMARY KEY NOT NULL,
    finished      integer NOT NULL,
    timestamp     integer NOT NULL,
    project       text NOT NULL,
    jobset        text NOT NULL,
    job           text NOT NULL,
    nixName       text,
    description   text,
    drvPath       text NOT NULL,
    system        text NOT NULL,
    license       text,
    homepage      text,
    maintainers   text,
    maxsilent     integer DEFAULT 3600,
    timeout       integer DEFAULT 36000,
    isChannel     integer NOT NULL DEFAULT 0,
    isCurrent     integer DEFAULT 0,
    nixExprInput  text,
    nixExprPath   text,
    priority      integer NOT NULL DEFAULT 0,
    globalPriority integer NOT NULL DEFAULT 0,
    startTime     integer,
    stopTime      integer,
    isCachedBuild integer,
    buildStatus   integer,
    size          bigint,
    closureSize   bigint,
    releaseName   text,
    keep          integer NOT NULL DEFAULT 0,
    notificationPendingSince integer,
    CHECK (finished = 0 OR (stoptime IS NOT NULL AND stoptime != 0)),
    CHECK (finished = 0 OR (starttime IS NOT NULL AND starttime != 0)),
    FOREIGN KEY (project) REFERENCES Projects(name) ON UPDATE CASCADE,
    FOREIGN KEY (project, jobset) REFERENCES Jobsets(project, name) ON UPDATE CASCADE,
    FOREIGN KEY (project, jobset, job) REFERENCES Jobs(project, jobset, name) ON UPDATE CASCADE
);

CREATE FUNCTION notifyBuildsDeleted() RETURNS trigger AS $$
BEGIN NOTIFY builds_deleted; RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER BuildsDeleted AFTER DELETE ON Builds
    FOR EACH STATEMENT EXECUTE PROCEDURE notifyBuildsDeleted();

CREATE FUNCTION notifyBuildRestarted() RETURNS trigger AS $$
BEGIN EXECUTE 'NOTIFY build_restarted, ' || quote_literal(new.id::text); RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER BuildRestarted AFTER UPDATE ON Builds FOR EACH ROW
    WHEN (old.finished = 1 AND new.finished = 0)
    EXECUTE PROCEDURE notifyBuildRestarted();

CREATE FUNCTION notifyBuildCancelled() RETURNS trigger AS $$
BEGIN EXECUTE 'NOTIFY build_cancelled, ' || quote_literal(new.id::text); RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER BuildCancelled AFTER UPDATE ON Builds FOR EACH ROW
    WHEN (old.finished = 0 AND new.finished = 1 AND new.buildStatus = 4)
    EXECUTE PROCEDURE notifyBuildCancelled();

CREATE FUNCTION notifyBuildBumped() RETURNS trigger AS $$
BEGIN EXECUTE 'NOTIFY builds_bumped, ' || quote_literal(new.id::text); RETURN NULL; END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER BuildBumped AFTER UPDATE ON Builds FOR EACH ROW
    WHEN (old.globalPriority != new.globalPriority)
    EXECUTE PROCEDURE notifyBuildBumped();

CREATE TABLE NrBuilds (
    what  text PRIMARY KEY NOT NULL,
    count integer NOT NULL
);
INSERT INTO NrBuilds(what, count) VALUES ('finished', 0);

-- Keeps NrBuilds('finished') equal to the number of finished builds. Fires on every
-- Builds row change, a backfill's too, and does nothing unless `finished` changes.
CREATE FUNCTION modifyNrBuildsFinished() RETURNS trigger AS $$
BEGIN
    IF ((tg_op = 'INSERT' AND new.finished = 1) OR
        (tg_op = 'UPDATE' AND old.finished = 0 AND new.finished = 1)) THEN
        UPDATE NrBuilds SET count = count + 1 WHERE what = 'finished';
    ELSIF ((tg_op = 'DELETE' AND old.finished = 1) OR
           (tg_op = 'UPDATE' AND old.finished = 1 AND new.finished = 0)) THEN
        UPDATE NrBuilds SET count = count - 1 WHERE what = 'finished';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER NrBuildsFinished AFTER INSERT OR UPDATE OR DELETE ON Builds
    FOR EACH ROW EXECUTE PROCEDURE modifyNrBuildsFinished();

CREATE TABLE BuildOutputs (
    build integer NOT NULL,
    name  text NOT NULL,
    path  text NOT NULL,
    PRIMARY KEY (build, name),
    FOREIGN KEY (build) REFERENCES Builds(id) ON DELETE CASCADE
);

CREATE TABLE BuildSteps (
    build     integer NOT NULL,
    stepnr    integer NOT NULL,
    type      integer NOT NULL,
    drvPath   text,
    busy      integer NOT NULL,
    status    integer,
    errorMsg  text,
    startTime integer,
    stopTime  integer,
    machine   text NOT NULL DEFAULT '',
    system    text,
    propagatedFrom integer,
    overhead  integer,
    timesBuilt integer,
    isNonDeterministic boolean,
    PRIMARY KEY (build, stepnr),
    FOREIGN KEY (build) REFERENCES Builds(id) ON DELETE CASCADE,
    FOREIGN KEY (propagatedFrom) REFERENCES Builds(id) ON DELETE CASCADE
);

CREATE TABLE BuildProducts (
    build       integer NOT NULL,
    productnr   integer NOT NULL,
    type        text NOT NULL,
    subtype     text NOT NULL,
    fileSize    bigint,
    sha256hash  text,
    path        text,
    name        text NOT NULL,
    defaultPath text,
    PRIMARY KEY (build, productnr),
    FOREIGN KEY (build) REFERENCES Builds(id) ON DELETE CASCADE
);

CREATE TABLE JobsetEvalMembers (
    eval  integer NOT NULL REFERENCES JobsetEvals(id) ON DELETE CASCADE,
    build integer NOT NULL REFERENCES Builds(id) ON DELETE CASCADE,
    isNew integer NOT NULL,
    PRIMARY KEY (eval, build)
);

CREATE INDEX IndexBuildOutputsPath ON BuildOutputs USING hash(path);
CREATE INDEX IndexBuildStepsOnBusy ON BuildSteps(busy) WHERE busy != 0;
CREATE INDEX IndexBuildStepsOnDrvPath ON BuildSteps(drvpath);
CREATE INDEX IndexBuildStepsOnPropagatedFrom ON BuildSteps(propagatedFrom) WHERE propagatedFrom IS NOT NULL;
CREATE INDEX IndexBuildsOnFinished ON Builds(finished) WHERE finished = 0;
CREATE INDEX IndexBuildsOnIsCurrent ON Builds(isCurrent) WHERE isCurrent = 1;
CREATE INDEX IndexBuildsOnJobsetIsCurrent ON Builds(project, jobset, isCurrent) WHERE isCurrent = 1;
CREATE INDEX IndexBuildsOnJobIsCurrent ON Builds(project, jobset, job, isCurrent) WHERE isCurrent = 1;
CREATE INDEX IndexBuildsOnJobset ON Builds(project, jobset);
CREATE INDEX IndexBuildsOnProject ON Builds(project);
CREATE INDEX IndexBuildsOnTimestamp ON Builds(timestamp);
CREATE INDEX IndexBuildsOnFinishedStopTime ON Builds(finished, stoptime DESC);
CREATE INDEX IndexBuildsOnJobFinishedId ON Builds(project, jobset, job, system, finished, id DESC);
CREATE INDEX IndexBuildsOnDrvPath ON Builds(drvPath);
CREATE INDEX IndexBuildsOnKeep ON Builds(keep) WHERE keep = 1;
CREATE INDEX IndexBuildsOnNotificationPendingSince ON Builds(notificationPendingSince)
    WHERE notificationPendingSince IS NOT NULL;
CREATE INDEX IndexTrgmBuildsOnDrvpath ON Builds USING gin (drvpath gin_trgm_ops);
CREATE INDEX IndexJobsetEvalMembersOnBuild ON JobsetEvalMembers(build);
CREATE INDEX IndexJobsetEvalMembersOnEval ON JobsetEvalMembers(eval);
CREATE INDEX IndexJobsetEvalsOnJobsetId ON JobsetEvals(project, jobset, id DESC) WHERE hasNewBuilds = 1;

INSERT INTO SchemaVersion (version) VALUES (57);
"#;

/// `upgrade-N.sql` for N in 58..=65, as each Hydra package applies them.
pub fn step_sql(n: i32) -> Option<&'static str> {
    Some(match n {
        58 => {
            "ALTER TABLE Jobsets ALTER COLUMN nixExprInput DROP NOT NULL,
                 ALTER COLUMN nixExprPath DROP NOT NULL,
                 ADD COLUMN type integer DEFAULT 0,
                 ADD COLUMN flake text,
                 ADD CHECK ((type = 0) = (nixExprInput IS NOT NULL AND nixExprPath IS NOT NULL)),
                 ADD CHECK ((type = 1) = (flake IS NOT NULL));
             ALTER TABLE JobsetEvals ADD COLUMN flake text;"
        }
        59 => {
            "ALTER TABLE Jobsets ADD COLUMN id SERIAL NOT NULL,
                 ADD CONSTRAINT Jobsets_id_unique UNIQUE (id);"
        }
        60 => {
            "ALTER TABLE Jobs ADD COLUMN jobset_id integer NULL,
                 ADD FOREIGN KEY (jobset_id) REFERENCES Jobsets(id) ON DELETE CASCADE;"
        }
        61 => {
            "ALTER TABLE Builds ADD COLUMN jobset_id integer NULL,
                 ADD FOREIGN KEY (jobset_id) REFERENCES Jobsets(id) ON DELETE CASCADE;"
        }
        62 => "ALTER TABLE Jobs ALTER COLUMN jobset_id SET NOT NULL;",
        63 => "ALTER TABLE Builds ALTER COLUMN jobset_id SET NOT NULL;",
        64 => {
            "CREATE INDEX IndexFinishedSuccessfulBuilds
                 ON Builds(id DESC, buildstatus, finished, job, jobset_id)
                 WHERE buildstatus = 0 AND finished = 1;"
        }
        65 => {
            "CREATE INDEX IndexBuildsOnJobsetIdFinishedId ON Builds(id DESC, finished, job, jobset_id);"
        }
        _ => return None,
    })
}

/// What one applied step cost: its transaction held its locks for `duration`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedStep {
    pub version: i32,
    pub duration: Duration,
    /// When it began, counted from the start of `apply_steps`.
    pub at: Duration,
}

/// Create the base schema (57) in an empty database.
pub fn load_base(db: &mut Db) -> Result<()> {
    db.client()
        .batch_execute(BASE_SQL)
        .context("loading Hydra's base schema (57)")
}

/// Bring the schema up to `target` exactly as `hydra-init` does: for each missing step one
/// transaction that runs `upgrade-N.sql` and sets `SchemaVersion` to N.
pub fn apply_steps(db: &mut Db, target: i32) -> Result<Vec<AppliedStep>> {
    let current: i32 = db
        .client()
        .query_one("SELECT version FROM SchemaVersion", &[])
        .context("reading SchemaVersion")?
        .get(0);
    let began = Instant::now();
    let mut applied = Vec::new();
    for n in current + 1..=target {
        let sql = step_sql(n).with_context(|| format!("no upgrade step {n} is known"))?;
        let start = Instant::now();
        let mut tx = db.client().transaction()?;
        tx.batch_execute(sql)
            .with_context(|| format!("schema upgrade failed at upgrade-{n}.sql"))?;
        tx.execute("UPDATE SchemaVersion SET version = $1", &[&n])?;
        tx.commit()
            .with_context(|| format!("committing upgrade-{n}.sql"))?;
        applied.push(AppliedStep {
            version: n,
            duration: start.elapsed(),
            at: start - began,
        });
    }
    Ok(applied)
}
