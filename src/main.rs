//! The `lorascope` binary: everything is in the library's [`lorascope::cli`].

fn main() {
    std::process::exit(lorascope::cli::main());
}
