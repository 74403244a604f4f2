//! A customizer that writes every peer of the tier to `/peers`, one `index hostname
//! address` line each, to check paging through `tier.peers`, and copies `/etc/motd` of
//! the master to `/motd-copy` to check reads of the master.
use mint_sdk::customizer::{Context, Customizer, Edit};
use mint_sdk::Error;
use mint_sdk::net::ToIpAddr;
struct Peers;
impl Customizer for Peers {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let mut text = String::new();
        for p in cx.peers() {
            text.push_str(&format!("{} {} {}\n", p.index, p.hostname, p.address.to_ip()));
        }
        let mut edits = vec![Edit::write("/peers", text, 0o644)];
        if let Some(motd) = cx.read_file("/etc/motd")? {
            edits.push(Edit::write("/motd-copy", motd, 0o600));
        }
        Ok(edits)
    }
}
mint_sdk::export_customizer!(Peers);
