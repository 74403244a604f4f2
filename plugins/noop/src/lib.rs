//! The `noop` provisioning driver: deploys nothing and reports success, for tests and
//! demonstrations of the engine without real nodes.
//!
//! A node's `noop-state` property (`absent`, `deploying`, `running`, `failed`) sets what
//! `status` reports, and `noop-fail` (any value) makes `deploy` fail, so that tests can
//! exercise the engine's handling of driver outcomes. The configuration key `deploy`
//! (`running`, the default, or `deploying`) sets what `deploy` answers, so that a tier can
//! behave like a driver whose deployments finish later and must be polled.

use mint_sdk::driver::{Deployment, Driver, InstanceState, Node, StatusReport};
use mint_sdk::{Config, Error, log};

/// The driver; see the crate documentation.
pub struct Noop;

impl Driver for Noop {
    fn deploy(node: &Node, d: &Deployment, config: &Config) -> Result<StatusReport, Error> {
        if let Some(why) = node.property("noop-fail") {
            return Err(Error::external(format!(
                "node `{}` refused the deployment: {why}",
                node.name
            )));
        }
        let state = match config
            .get_or::<String>("deploy", "running".into())?
            .as_str()
        {
            "running" => InstanceState::Running,
            "deploying" => InstanceState::Deploying,
            other => {
                return Err(Error::invalid_input(format!(
                    "config `deploy` is `{other}`; use running or deploying"
                )));
            }
        };
        log::log(
            log::Level::Info,
            "deploy",
            &[("node", &node.name), ("instance", &d.hostname)],
        );
        Ok(StatusReport::new(
            state,
            format!("{} on {} (noop)", d.hostname, node.name),
        ))
    }

    fn undeploy(_node: &Node, _d: &Deployment, _config: &Config) -> Result<(), Error> {
        Ok(())
    }

    fn status(node: &Node, _d: &Deployment, _config: &Config) -> Result<StatusReport, Error> {
        let state = match node.property("noop-state").unwrap_or("running") {
            "absent" => InstanceState::Absent,
            "deploying" => InstanceState::Deploying,
            "running" => InstanceState::Running,
            "failed" => InstanceState::Failed,
            other => {
                return Err(Error::invalid_input(format!(
                    "node `{}`: property `noop-state` is `{other}`; use absent, deploying, running or failed",
                    node.name
                )));
            }
        };
        Ok(StatusReport::new(state, "noop"))
    }
}

mint_sdk::export_driver!(Noop);
