use clap::Parser;

fn main() {
    let config = parlor::config::Config::parse();
    simple_logger::SimpleLogger::new()
        .with_level(config.log_level)
        .init()
        .expect("logger");
    log::info!("config: {config:?}");
}
