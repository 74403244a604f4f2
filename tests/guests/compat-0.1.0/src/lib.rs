//! A node policy built against `mint:plugin@0.1.0` as it was released (the WIT beside this
//! crate is a frozen copy), to check that a host speaking a later 0.1.x still loads and
//! calls it. It picks the first `count` candidates and says so through `host.log`.
wit_bindgen::generate!({
    path: "wit",
    world: "node-policy-plugin",
});
use exports::mint::plugin::node_policy::{Choice, Guest, SelectionRequest};
use mint::plugin::types::PluginError;
struct FirstFit;
impl Guest for FirstFit {
    fn select(request: SelectionRequest) -> Result<Vec<Choice>, PluginError> {
        mint::plugin::host::log(mint::plugin::types::LogLevel::Info, "built for mint:plugin@0.1.0", &[]);
        Ok((0..request.count).map(|i| Choice { candidate: i, score: None, reason: Some("first fit (0.1.0)".into()) }).collect())
    }
}
export!(FirstFit);
