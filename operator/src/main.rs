//! Entry point of the `vmstream-operator` binary: parse flags, set up
//! logging, run [`vmstream_operator::run::run`].

use clap::Parser;
use vmstream_operator::config::OperatorConfig;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let config = OperatorConfig::parse();
    match vmstream_operator::run::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let mut message = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                message.push_str(&format!(": {s}"));
                source = s.source();
            }
            tracing::error!("{message}");
            std::process::ExitCode::FAILURE
        }
    }
}
