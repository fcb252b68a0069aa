fn main() {
    // candle captures a backtrace inside every error it creates whenever RUST_BACKTRACE is set
    // (std's `Backtrace::capture` follows it unless RUST_LIB_BACKTRACE says otherwise), and
    // prints it as part of the error's message. For a user that turns a one-line cause ("shape
    // mismatch for …") into fifty lines of frames, and resolving them takes a second or more
    // per error. Panics keep their backtraces (RUST_BACKTRACE still governs those); a user who
    // wants library backtraces too sets RUST_LIB_BACKTRACE=1 explicitly. Set before any thread
    // starts, and inherited by the stage processes sdpipe spawns.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    sdpipe_stages::process::set_up();
    std::process::exit(sdpipe::cli::main());
}
