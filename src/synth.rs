//! A synthetic Hydra database at schema 57 for rehearsals, tests and the benchmark: many
//! projects, jobset names shared across projects, a few large jobsets and many small
//! ones, builds spread unevenly over jobs, rows close to Hydra's width (about 32 a heap
//! page: the optional text columns are set on one build in 16), every Builds index and
//! trigger in place. Deterministic for a given seed.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::db::Db;
use crate::hydra_schema;

#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub projects: u64,
    pub jobsets: u64,
    pub jobs: u64,
    pub builds: u64,
    pub seed: u64,
}

/// Builds are inserted this many per statement (modest statements keep the load linear).
const CHUNK: u64 = 20_000;

/// Jobset names; a project's n-th jobset takes the n-th name, so names repeat across projects.
const JOBSET_NAMES: &str = "ARRAY['trunk','staging','master','release-20.03','release-19.09',\
'staging-next','haskell-updates','python-unstable','pr-review','nightly']";

/// Load schema 57 and fill it. The database must be empty.
pub fn generate(db: &mut Db, spec: &Spec) -> Result<()> {
    hydra_schema::load_base(db)?;
    let c = db.client();
    let seed = (spec.seed % 1000) as f64 / 1000.0;
    let p = spec.projects.max(1) as i64;
    let js = spec.jobsets.max(1) as i64;
    let jobs = spec.jobs.max(1) as i64;
    c.execute("SELECT setseed($1)", &[&seed])?;
    c.batch_execute(
        "INSERT INTO Users (userName, fullName, emailAddress, password)
         VALUES ('admin', 'Hydra Admin', 'admin@example.org', 'x')",
    )?;
    c.execute(
        "INSERT INTO Projects (name, displayName, description, owner, homepage)
         SELECT 'project-' || i, 'Project ' || i, 'Synthetic project number ' || i, 'admin',
                'https://example.org/project-' || i
           FROM generate_series(1, $1::bigint) i",
        &[&p],
    )?;
    let jobsets_sql = format!(
        "INSERT INTO Jobsets (name, project, description, nixExprInput, nixExprPath, emailOverride)
         SELECT CASE WHEN n < 10 THEN ({JOBSET_NAMES})[n + 1] ELSE 'jobset-' || n END,
                'project-' || (1 + (k - 1) % $1), 'synthetic', 'src', 'release.nix', ''
           FROM (SELECT k, (k - 1) / $1 AS n FROM generate_series(1, $2::bigint) k) s"
    );
    c.execute(&jobsets_sql, &[&p, &js])?;
    // Jobs: jobset rank r gets a share falling off as a power law: a few big jobsets
    // (think nixpkgs trunk) and a long tail of small ones.
    c.execute(
        "INSERT INTO Jobs (project, jobset, name)
         SELECT js.project, js.name, 'job-' || i
           FROM (SELECT i, 1 + floor($2::bigint * power(random(), 3))::bigint AS r
                   FROM generate_series(1, $1::bigint) i) x
           JOIN (SELECT project, name, row_number() OVER (ORDER BY project, name) AS r FROM Jobsets) js
             ON js.r = x.r",
        &[&jobs, &js],
    )?;
    c.batch_execute(
        "CREATE TEMP TABLE synth_jobs AS
             SELECT row_number() OVER (ORDER BY project, jobset, name) AS rn, project, jobset, name FROM Jobs;
         CREATE UNIQUE INDEX ON synth_jobs (rn);
         ALTER TABLE Builds DISABLE TRIGGER NrBuildsFinished;",
    )?;
    let njobs: i64 = c.query_one("SELECT count(*) FROM synth_jobs", &[])?.get(0);
    let total = spec.builds as i64;
    let unfinished_from = total - (total / 50).max(1);
    let mut from = 1i64;
    while from <= total {
        let to = (from + CHUNK as i64 - 1).min(total);
        c.execute(
            "INSERT INTO Builds (finished, timestamp, project, jobset, job, nixName, description,
                 drvPath, system, license, homepage, maintainers, isCurrent, nixExprInput,
                 nixExprPath, priority, startTime, stopTime, isCachedBuild, buildStatus, size,
                 closureSize, releaseName, keep)
             SELECT CASE WHEN g >= $3 THEN 0 ELSE 1 END,
                    1500000000 + g * 17, j.project, j.jobset, j.name,
                    j.name || '-' || (g % 97) || '.' || (g % 13),
                    CASE WHEN g % 16 = 0 THEN 'A synthetic package' END,
                    '/nix/store/' || substr(md5(g::text), 1, 32) || '-' || j.name || '-' || (g % 97) || '.drv',
                    (ARRAY['x86_64-linux', 'aarch64-linux', 'x86_64-darwin'])[1 + g % 3],
                    CASE WHEN g % 16 = 0 THEN 'MIT' END,
                    CASE WHEN g % 16 = 0 THEN 'https://example.org/' || j.name END,
                    CASE WHEN g % 16 = 0 THEN 'alice@example.org' END,
                    CASE WHEN g % 7 = 0 THEN 1 ELSE 0 END, 'src', 'release.nix', 100,
                    CASE WHEN g >= $3 THEN NULL ELSE 1500000100 + g * 17 END,
                    CASE WHEN g >= $3 THEN NULL ELSE 1500000200 + g * 17 END,
                    CASE WHEN g >= $3 THEN NULL ELSE (g % 5 = 0)::int END,
                    CASE WHEN g >= $3 THEN NULL WHEN g % 11 = 0 THEN 1 ELSE 0 END,
                    CASE WHEN g >= $3 THEN NULL ELSE 1000 + g % 100000 END,
                    CASE WHEN g >= $3 THEN NULL ELSE 100000 + g % 1000000 END,
                    NULL, 0
               FROM (SELECT g, 1 + floor(power(random(), 2) * $4::bigint)::bigint AS rn
                       FROM generate_series($1::bigint, $2::bigint) g) x
               JOIN synth_jobs j ON j.rn = x.rn
              ORDER BY g",
            &[&from, &to, &unfinished_from, &njobs],
        )
        .with_context(|| format!("inserting synthetic builds {from}..{to}"))?;
        from = to + 1;
    }
    c.batch_execute(
        "ALTER TABLE Builds ENABLE TRIGGER NrBuildsFinished;
         UPDATE NrBuilds SET count = (SELECT count(*) FROM Builds WHERE finished = 1) WHERE what = 'finished';
         DROP TABLE synth_jobs;
         ANALYZE;",
    )?;
    Ok(())
}
