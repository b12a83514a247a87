//! `picocenter`: the command line. It only parses arguments and wires the libraries
//! together; everything it runs lives in the workspace crates.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose, args.log_format, args.is_service());
    match cli::dispatch(args) {
        Ok(status) => std::process::exit(status),
        Err(err) => {
            eprintln!(
                "picocenter: error: {}",
                picocenter_vmm::report::error_chain(err.as_ref())
            );
            std::process::exit(1);
        }
    }
}
