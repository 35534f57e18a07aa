//! A standalone page server (tests run it inside a network namespace as the
//! "home node"): serves live-image page stores and node caches by image id.
//! Prints `listening <addr>` once bound; then reads commands on stdin:
//! `stats` prints the counters as one JSON line, `quit` or end of input exits.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use vmstream_pagestream::{ClusterToken, NodeImageCache, PageServer, ServerOptions};
use vmstream_vmm::image::PageStore;

#[derive(Debug, Parser)]
#[command(about = "Serve live-image pages over the vmstream page-streaming protocol")]
struct Args {
    /// Address to listen on (e.g. 10.1.2.1:7070).
    #[arg(long)]
    listen: String,
    /// File holding the cluster token.
    #[arg(long)]
    token_file: PathBuf,
    /// An image page store to serve, as ID=DIR (repeatable).
    #[arg(long = "image", value_parser = parse_pair)]
    images: Vec<(String, PathBuf)>,
    /// A node image cache to serve the pages it holds, as DIR (repeatable).
    #[arg(long = "cache")]
    caches: Vec<PathBuf>,
}

fn parse_pair(s: &str) -> Result<(String, PathBuf), String> {
    let (id, dir) = s.split_once('=').ok_or("expected ID=DIR")?;
    Ok((id.to_owned(), PathBuf::from(dir)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let token = ClusterToken::from_file(&args.token_file)?;
    let server = PageServer::bind(&args.listen, token, ServerOptions::default())?;
    for (id, dir) in &args.images {
        let store = PageStore::open(dir)?;
        server.add_image(id, Arc::new(store));
    }
    for dir in &args.caches {
        let cache = NodeImageCache::open_existing(dir)?
            .ok_or_else(|| format!("no node image cache in {}", dir.display()))?;
        let id = cache.image_id().to_owned();
        server.add_image(&id, cache);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {}", server.local_addr())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "stats" => {
                writeln!(out, "{}", serde_json::to_string(&server.stats())?)?;
                out.flush()?;
            }
            "quit" => break,
            "" => {}
            other => eprintln!("unknown command {other:?} (stats, quit)"),
        }
    }
    server.shutdown();
    Ok(())
}
