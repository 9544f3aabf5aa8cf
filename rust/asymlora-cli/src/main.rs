fn main() {
    std::process::exit(asymlora_cli::run(std::env::args_os()));
}
