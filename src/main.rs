fn main() {
    std::process::exit(sdpipe::cli::main());
}
