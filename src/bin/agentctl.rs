//! `agentctl`: the user's CLI. All logic lives in `agenttask::ctl`.

fn main() -> std::process::ExitCode {
    agenttask::ctl::main()
}
