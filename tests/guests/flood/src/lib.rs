//! A customizer that answers too much: `lines` log lines and `mib` MiB of file edits, to
//! check the host's caps on logs and on the size of an answer.
use mint_sdk::customizer::{Context, Customizer, Edit};
use mint_sdk::{Error, log};
struct Flood;
impl Customizer for Flood {
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error> {
        let lines: u32 = cx.config.get_or("lines", 0)?;
        let mib: u32 = cx.config.get_or("mib", 0)?;
        for i in 0..lines {
            log::info(&format!("line {i} {}", "x".repeat(10_000)));
        }
        Ok((0..mib).map(|i| Edit::write(format!("/flood/{i}"), vec![b'z'; 1 << 20], 0o644)).collect())
    }
}
mint_sdk::export_customizer!(Flood);
