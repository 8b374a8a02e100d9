//! Readers for the STS task files in SentEval's layout, with errors that name the file and line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::data::read_lines;

/// The seven STS tasks SimCSE and KDMCSE report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    #[value(name = "STS12")]
    Sts12,
    #[value(name = "STS13")]
    Sts13,
    #[value(name = "STS14")]
    Sts14,
    #[value(name = "STS15")]
    Sts15,
    #[value(name = "STS16")]
    Sts16,
    #[value(name = "STSBenchmark")]
    StsBenchmark,
    #[value(name = "SICKRelatedness")]
    SickRelatedness,
}

impl Task {
    pub const ALL: [Task; 7] = [
        Task::Sts12,
        Task::Sts13,
        Task::Sts14,
        Task::Sts15,
        Task::Sts16,
        Task::StsBenchmark,
        Task::SickRelatedness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Sts12 => "STS12",
            Task::Sts13 => "STS13",
            Task::Sts14 => "STS14",
            Task::Sts15 => "STS15",
            Task::Sts16 => "STS16",
            Task::StsBenchmark => "STSBenchmark",
            Task::SickRelatedness => "SICKRelatedness",
        }
    }

    /// SentEval's subsets of STS12-16 (STS13's SMT set is not distributed).
    fn sts_subsets(self) -> &'static [&'static str] {
        match self {
            Task::Sts12 => &["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
            Task::Sts13 => &["FNWN", "headlines", "OnWN"],
            Task::Sts14 => &["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
            Task::Sts15 => &["answers-forums", "answers-students", "belief", "headlines", "images"],
            Task::Sts16 => &["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
            Task::StsBenchmark | Task::SickRelatedness => &[],
        }
    }
}

/// Sentence pairs with gold scores.
#[derive(Debug, Clone, Default)]
pub struct TaskData {
    pub first: Vec<String>,
    pub second: Vec<String>,
    pub gold: Vec<f64>,
}

impl TaskData {
    pub fn len(&self) -> usize {
        self.gold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gold.is_empty()
    }

    fn push(&mut self, a: &str, b: &str, gold: f64) {
        self.first.push(rejoin(a));
        self.second.push(rejoin(b));
        self.gold.push(gold);
    }
}

/// SentEval splits sentences on whitespace and the encoder re-joins the tokens with one space.
fn rejoin(sentence: &str) -> String {
    sentence.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_score(text: &str, path: &Path, line: usize) -> Result<f64> {
    let score: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("{}:{line}: gold score {text:?} is not a number", path.display()))?;
    if !score.is_finite() {
        bail!("{}:{line}: gold score {text:?} is not finite", path.display());
    }
    Ok(score)
}

/// Where a task's files are under `data_dir`; `None` when they are absent.
pub fn locate(data_dir: &Path, task: Task) -> Option<PathBuf> {
    match task {
        Task::StsBenchmark => Some(data_dir.join("stsb").join("sts-test.csv")).filter(|p| p.is_file()),
        Task::SickRelatedness => {
            Some(data_dir.join("sick").join("SICK_test_annotated.txt")).filter(|p| p.is_file())
        }
        _ => {
            let folder = format!("{}-en-test", task.name());
            let direct = data_dir.join(&folder);
            if direct.is_dir() {
                return Some(direct);
            }
            // One level below (the shared data keeps samples under sts-samples/).
            let mut below: Vec<PathBuf> = std::fs::read_dir(data_dir)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path().join(&folder)))
                .filter(|p| p.is_dir())
                .collect();
            below.sort();
            below.into_iter().next()
        }
    }
}

/// STS-B dev (`stsb/sts-dev.csv`), the split used for model selection during training.
pub fn load_stsb_dev(data_dir: &Path) -> Result<TaskData> {
    let path = data_dir.join("stsb").join("sts-dev.csv");
    if !path.is_file() {
        bail!("STS-B dev set not found: {}", path.display());
    }
    let data = read_columns(&path, false, (5, 6, 4))?;
    // Spearman needs two pairs of different gold scores; anything less selects models on NaN.
    let distinct = data.gold.iter().any(|g| Some(g) != data.gold.first());
    if data.len() < 2 || !distinct {
        bail!(
            "{}: {} scored sentence pairs{}: model selection needs at least two with different scores",
            path.display(),
            data.len(),
            if distinct || data.is_empty() { "" } else { ", all with the same score" }
        );
    }
    Ok(data)
}

/// Loads a task from `data_dir`; `Ok(None)` when its files are absent.
pub fn load_task(data_dir: &Path, task: Task) -> Result<Option<TaskData>> {
    let Some(path) = locate(data_dir, task) else { return Ok(None) };
    let data = match task {
        Task::StsBenchmark => read_columns(&path, false, (5, 6, 4))?,
        Task::SickRelatedness => read_columns(&path, true, (1, 2, 3))?,
        _ => {
            let mut data = TaskData::default();
            for subset in task.sts_subsets() {
                read_sts_subset(&path, subset, &mut data)?;
            }
            data
        }
    };
    if data.is_empty() {
        bail!("{}: no scored sentence pairs", path.display());
    }
    Ok(Some(data))
}

/// Tab-separated file with the two sentences and the score in the given columns.
fn read_columns(path: &Path, header: bool, (a, b, score): (usize, usize, usize)) -> Result<TaskData> {
    let mut data = TaskData::default();
    let needed = a.max(b).max(score) + 1;
    for (index, line) in read_lines(path)?.iter().enumerate().skip(usize::from(header)) {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < needed {
            bail!(
                "{}:{line_no}: expected at least {needed} tab-separated columns, found {}",
                path.display(),
                cols.len()
            );
        }
        data.push(cols[a], cols[b], parse_score(cols[score], path, line_no)?);
    }
    Ok(data)
}

/// One STS12-16 subset: `STS.input.NAME.txt` (two sentences a line) and `STS.gs.NAME.txt` (a
/// score a line, empty where the pair is not scored).
fn read_sts_subset(dir: &Path, subset: &str, data: &mut TaskData) -> Result<()> {
    let input_path = dir.join(format!("STS.input.{subset}.txt"));
    let gold_path = dir.join(format!("STS.gs.{subset}.txt"));
    let inputs = read_lines(&input_path)?;
    let gold = read_lines(&gold_path)?;
    if gold.len() != inputs.len() {
        bail!(
            "{} has {} lines but {} has {}: every input pair needs a gold line (empty if unscored)",
            gold_path.display(),
            gold.len(),
            input_path.display(),
            inputs.len()
        );
    }
    for (index, (input, score)) in inputs.iter().zip(&gold).enumerate() {
        let line_no = index + 1;
        let cols: Vec<&str> = input.split('\t').collect();
        if cols.len() != 2 {
            bail!(
                "{}:{line_no}: expected two tab-separated sentences, found {} columns",
                input_path.display(),
                cols.len()
            );
        }
        if score.trim().is_empty() {
            continue; // unscored pair
        }
        data.push(cols[0], cols[1], parse_score(score, &gold_path, line_no)?);
    }
    Ok(())
}
