//! The smallest farm: one coordinator, one builder, a chain of three
//! derivations submitted over gRPC. Every part is real: the binaries, Nix in
//! each actor's own store, loopback sockets.

use farm_proto::v1::BuildOutcome;
use farm_tests::fixture::*;
use farm_tests::{TestLogs, deadline_async};

#[test]
fn one_builder_builds_a_small_chain() -> anyhow::Result<()> {
    let logs = TestLogs::new("farm_smoke")?;
    deadline_async(DEADLINE, &logs, |logs| async move {
        one_builder_builds_a_small_chain_run(&logs).await
    })
}

async fn one_builder_builds_a_small_chain_run(logs: &TestLogs) -> anyhow::Result<()> {
    let farm = Farm::start(
        logs,
        &[BuilderSpec {
            name: "solo",
            max_jobs: 2,
            conf: &["system-features ="],
        }],
        &[],
    )?;
    let expr = format!(
        "let {prelude}\n  a = mk \"smoke-a\" \"echo a > $out\" [];\n  \
         b = mk \"smoke-b\" \"cat ${{a}} > $out; echo b >> $out\" [ a ];\n  \
         c = mk \"smoke-c\" \"cat ${{b}} > $out; echo c >> $out\" [ b ];\nin c\n",
        prelude = prelude(farm.witness_dir())
    );
    let file = farm.client.write_file("smoke.nix", &expr)?;
    let drvs = farm.client.nix_instantiate(&file, &[] as &[&str])?;
    assert_eq!(drvs.len(), 1, "{drvs:?}");
    let uploaded = farm.upload_closure(&drvs).await?;
    assert_eq!(uploaded, 3, "three .drv files, no sources");

    let mut events = farm.submit(&drvs).await?;
    let done = events.done(GRAPH_TIMEOUT).await?;
    let outcomes = events.outcomes();
    assert!(done.success, "{}", events.render());
    assert_eq!(done.built, 3, "{}", events.render());
    let top = &outcomes[&drvs[0].to_string()];
    assert_eq!(outcome(top), BuildOutcome::Built, "{}", events.render());
    assert_eq!(top.builder, "solo");
    let witness = farm.witness_lines()?;
    assert_eq!(witness.len(), 3, "each derivation built once: {witness:?}");
    assert!(witness.iter().all(|(_, b)| b == "solo"), "{witness:?}");
    Ok(())
}
