//! `sanctum chat MODEL`: an interactive conversation with a verified chat model. The key/value cache
//! carries over between turns, so each turn only computes its new tokens.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use runner::chat::GenerateError;
use runner::engine::Reply;
use runner::template::Message;

use super::Context;

use super::run::{GenerationArgs, ModelArgs, StdoutSink, open_beside_load, reply_record, summary};
use super::stamp::OutputArgs;
use ::attest::statement::OutputTask;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Model name from the lockfile.
    model: String,
    /// A system message that opens the conversation (kept across /reset).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    #[command(flatten)]
    attest: PromptArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    #[command(flatten)]
    model_args: ModelArgs,
}

/// Every reply is stamped into the local attestation store.
#[derive(Debug, Args)]
struct PromptArgs {
    /// Put each rendered prompt's text in its reply's attestation (its sha256 is always there).
    #[arg(long)]
    attest_prompt: bool,
}

const HELP: &str = "/reset forgets the conversation, /exit (or Ctrl-D) leaves";

pub fn run(args: ChatArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let options = args.generation.options();
    options.sampling.validate()?;
    let verbose = args.model_args.verbose;
    let output = OutputArgs {
        out: None,
        attest_prompt: args.attest.attest_prompt,
    };
    let (stamper, loaded) = open_beside_load(ctx, &output, &args.model, &args.model_args)?;
    let entry = stamper.model(&args.model)?;
    let mut session = loaded.model.session();
    if !loaded.model.has_template() {
        anyhow::bail!(
            "model {:?} has no chat template, so it cannot hold a conversation: use `sanctum run --raw`",
            args.model
        );
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("{} ({HELP})", loaded.model.name());
    }
    let start: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect();
    let mut history = start.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!(">>> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else {
            if interactive {
                eprintln!();
            }
            break;
        };
        let line = line.context("reading stdin")?;
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/bye" | "/quit" => break,
            "/reset" | "/clear" => {
                history = start.clone();
                session.reset();
                if interactive {
                    eprintln!("(conversation forgotten)");
                }
                continue;
            }
            "/help" | "/?" => {
                eprintln!("{HELP}");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", input));
        let started = std::time::SystemTime::now();
        let prompt = loaded.model.render(&history, true)?;
        let tokens = loaded.model.tokenize_rendered(&prompt)?;
        let mut sink = StdoutSink::new();
        let generation = match loaded
            .model
            .generate(&mut session, &tokens, &options, &mut |t| sink.write(t))
        {
            Ok(g) => g,
            Err(e @ GenerateError::PromptTooLong { .. }) => {
                history.pop();
                eprintln!("sanctum: {e}; /reset starts over");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let _ = sink.write(if sink.ends_with_newline { "\n" } else { "\n\n" });
        let printed = sink.finish().context("writing to stdout")?;
        stamper.emit(
            None,
            reply_record(
                &loaded,
                entry,
                Reply {
                    task: OutputTask::Chat,
                    options: &options,
                    prompt: &prompt,
                    bytes: &printed,
                    generation: &generation,
                    started,
                    request: None,
                },
            ),
        )?;
        history.push(Message::new("assistant", generation.text.as_str()));
        if verbose {
            eprintln!(
                "[{} of {} prompt tokens computed] {}",
                generation.prompt_evaluated,
                generation.prompt_tokens,
                summary(&loaded, &generation)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
