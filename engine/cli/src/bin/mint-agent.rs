//! The `mint-agent` binary: the node agent, run on each node (see the `mint-agent` crate).

fn main() -> std::process::ExitCode {
    mint_agent::main()
}
