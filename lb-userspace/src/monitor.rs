//! `xlb stats` and `xlb top`: the daemon's counters for people.
//!
//! Both read [`Stats`] snapshots through the control API
//! ([`Request::Stats`]), the same reading `/metrics` serves, and turn two
//! of them into rates: the difference of each counter over the difference
//! of the snapshots' own timestamps (taken by the daemon when it read the
//! maps, so the CLI's own latency does not skew them).

use std::{
    path::Path,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Row, Table},
};
use serde::Serialize;

use crate::{
    api::{Client, Request, Response, endpoint},
    metrics::{Stats, TrafficStats},
};

/// Asks the daemon for one snapshot.
pub fn snapshot(client: &mut Client) -> anyhow::Result<Stats> {
    match client.call(&Request::Stats)? {
        Response::Stats { stats } => Ok(*stats),
        Response::Error { message } => Err(anyhow::anyhow!("{message}")),
        other => Err(anyhow::anyhow!("unexpected answer to stats: {other:?}")),
    }
}

/// Per-second rates of one traffic row between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TrafficRate {
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    pub new_flows_per_sec: f64,
}

fn rate(now: &TrafficStats, then: Option<&TrafficStats>, secs: f64) -> TrafficRate {
    let Some(then) = then else {
        return TrafficRate::default();
    };
    // A counter that went down was reset (an id reused, the maps recreated):
    // no rate rather than a huge one.
    let per_sec = |a: u64, b: u64| a.checked_sub(b).map_or(0.0, |d| d as f64 / secs);
    TrafficRate {
        packets_per_sec: per_sec(now.packets, then.packets),
        bytes_per_sec: per_sec(now.bytes, then.bytes),
        new_flows_per_sec: per_sec(now.new_flows, then.new_flows),
    }
}

/// One row of a rates table: who, its totals and its rates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateRow {
    /// `vip`, `vip/cluster` or `vip/cluster/backend`.
    pub name: String,
    /// What else a person wants on the row (endpoint, health, ...).
    pub detail: String,
    pub total: TrafficStats,
    pub rate: TrafficRate,
}

/// Rates per VIP, cluster and backend, and per global counter, between
/// two snapshots, each list sorted by packet rate (highest first).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rates {
    pub interval_secs: f64,
    pub vips: Vec<RateRow>,
    pub clusters: Vec<RateRow>,
    pub backends: Vec<RateRow>,
    /// Global counters: name, total, per second.
    pub counters: Vec<(String, u64, f64)>,
}

impl Rates {
    pub fn between(then: &Stats, now: &Stats) -> Rates {
        let secs = (now.taken_at - then.taken_at).max(1e-3);
        let mut vips: Vec<RateRow> = now
            .vips
            .iter()
            .map(|v| RateRow {
                name: v.name.clone(),
                detail: format!("{}/{}", endpoint(v.addr, v.port), v.proto),
                total: v.traffic,
                rate: rate(
                    &v.traffic,
                    then.vips
                        .iter()
                        .find(|o| o.name == v.name)
                        .map(|o| &o.traffic),
                    secs,
                ),
            })
            .collect();
        let mut clusters: Vec<RateRow> = now
            .clusters
            .iter()
            .map(|c| RateRow {
                name: format!("{}/{}", c.vip, c.name),
                detail: String::new(),
                total: c.traffic,
                rate: rate(
                    &c.traffic,
                    then.clusters
                        .iter()
                        .find(|o| o.vip == c.vip && o.name == c.name)
                        .map(|o| &o.traffic),
                    secs,
                ),
            })
            .collect();
        let mut backends: Vec<RateRow> = now
            .backends
            .iter()
            .map(|b| RateRow {
                name: format!("{}/{}/{}", b.vip, b.cluster, b.name),
                detail: format!(
                    "{} {} {} ring {:.1}%",
                    b.addr,
                    b.health,
                    b.admin,
                    b.ring_share * 100.0
                ),
                total: b.traffic,
                rate: rate(
                    &b.traffic,
                    then.backends
                        .iter()
                        .find(|o| o.vip == b.vip && o.cluster == b.cluster && o.name == b.name)
                        .map(|o| &o.traffic),
                    secs,
                ),
            })
            .collect();
        for rows in [&mut vips, &mut clusters, &mut backends] {
            rows.sort_by(|a, b| {
                b.rate
                    .packets_per_sec
                    .total_cmp(&a.rate.packets_per_sec)
                    .then_with(|| a.name.cmp(&b.name))
            });
        }
        let counters = now
            .counters
            .iter()
            .map(|(name, value)| {
                let before = then
                    .counters
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(*value, |(_, v)| *v);
                let per_sec = value.checked_sub(before).map_or(0.0, |d| d as f64 / secs);
                (name.clone(), *value, per_sec)
            })
            .collect();
        Rates {
            interval_secs: secs,
            vips,
            clusters,
            backends,
            counters,
        }
    }
}

/// `1234567` → `1.23 M`: three significant digits and an SI prefix.
pub fn si(value: f64, unit: &str) -> String {
    const PREFIXES: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let mut v = value;
    let mut i = 0;
    while v.abs() >= 999.5 && i + 1 < PREFIXES.len() {
        v /= 1000.0;
        i += 1;
    }
    let whole = (i == 0 && v.fract() == 0.0) || v.abs() >= 99.95;
    let digits = if whole {
        0
    } else if v.abs() >= 9.995 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {}{unit}", PREFIXES[i])
        .trim_end()
        .to_owned()
}

// ---------------------------------------------------------------------------
// xlb stats

/// `xlb stats`: two snapshots `interval` apart; the second's totals with the
/// rates between them, as tables or as JSON (`{"stats": ..., "rates": ...}`).
pub fn stats_command(socket: &Path, json: bool, interval: Duration) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(socket)?;
    let then = snapshot(&mut client)?;
    thread::sleep(interval);
    let now = snapshot(&mut client)?;
    let rates = Rates::between(&then, &now);
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            stats: &'a Stats,
            rates: &'a Rates,
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Out {
                stats: &now,
                rates: &rates,
            })?
        );
    } else {
        print!("{}", stats_text(&now, &rates));
    }
    Ok(ExitCode::SUCCESS)
}

fn traffic_cells(row: &RateRow) -> Vec<String> {
    vec![
        si(row.rate.packets_per_sec, "pps"),
        si(row.rate.bytes_per_sec * 8.0, "bit/s"),
        si(row.rate.new_flows_per_sec, "flows/s"),
        si(row.total.packets as f64, "pkt"),
        si(row.total.bytes as f64, "B"),
        si(row.total.new_flows as f64, "flows"),
    ]
}

/// The tables `xlb stats` prints.
pub fn stats_text(stats: &Stats, rates: &Rates) -> String {
    let mut out = format!(
        "rates over the last {:.2} s (two readings of the maps, timed by the daemon)\n\n",
        rates.interval_secs
    );
    let section = |out: &mut String, title: &str, first: &str, rows: &[RateRow]| {
        let header = [
            first,
            "",
            "packets/s",
            "bits/s",
            "new flows/s",
            "packets",
            "bytes",
            "flows",
        ];
        let body: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let mut cells = vec![r.name.clone(), r.detail.clone()];
                cells.extend(traffic_cells(r));
                cells
            })
            .collect();
        out.push_str(title);
        out.push('\n');
        out.push_str(&crate::cli::table(&header, &body, "  "));
        out.push('\n');
    };
    section(&mut out, "VIPs", "vip", &rates.vips);
    section(&mut out, "clusters", "vip/cluster", &rates.clusters);
    section(&mut out, "backends", "vip/cluster/backend", &rates.backends);
    let counters: Vec<Vec<String>> = rates
        .counters
        .iter()
        .filter(|(_, total, _)| *total > 0)
        .map(|(name, total, per_sec)| vec![name.clone(), si(*per_sec, "/s"), si(*total as f64, "")])
        .collect();
    out.push_str("data-plane counters (those not zero)\n");
    out.push_str(&crate::cli::table(
        &["counter", "rate", "total"],
        &counters,
        "  ",
    ));
    let c = &stats.conntrack;
    out.push_str(&format!(
        "\nconnection table: {} of {} entries ({:.2}%){}\n",
        si(c.entries as f64, ""),
        si(c.capacity as f64, ""),
        if c.capacity == 0 {
            0.0
        } else {
            c.entries as f64 * 100.0 / c.capacity as f64
        },
        if c.sampled_sets < c.sets {
            format!(", estimated from {} of {} sets", c.sampled_sets, c.sets)
        } else {
            String::new()
        }
    ));
    if let Some(micros) = stats.last_reconcile_micros {
        out.push_str(&format!(
            "last reconcile: {}\n",
            si(micros as f64 / 1e6, "s")
        ));
    }
    let attached: Vec<String> = stats
        .attachments
        .iter()
        .map(|a| format!("{} ({})", a.interface, a.mode))
        .collect();
    out.push_str(&format!(
        "attached to: {}\n",
        if attached.is_empty() {
            "no interface".to_owned()
        } else {
            attached.join(", ")
        }
    ));
    out
}

// ---------------------------------------------------------------------------
// xlb top

/// `xlb top`: redraws the rates every `interval` until q, Esc or Ctrl-C.
/// The terminal is restored on every way out, errors included.
pub fn top_command(socket: &Path, interval: Duration) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(socket)?;
    let mut then = snapshot(&mut client)?;
    let mut terminal = ratatui::try_init()?;
    let result = top_loop(&mut terminal, &mut client, &mut then, interval);
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

fn top_loop(
    terminal: &mut DefaultTerminal,
    client: &mut Client,
    then: &mut Stats,
    interval: Duration,
) -> anyhow::Result<()> {
    // The first frame has no rates yet: shown at once, with totals.
    let mut rates = Rates::between(then, then);
    let mut next = Instant::now() + interval;
    loop {
        terminal.draw(|frame| draw(frame, then, &rates))?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()? {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                let quit = matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc);
                if key.kind == KeyEventKind::Press && (quit || ctrl_c) {
                    return Ok(());
                }
            }
            continue;
        }
        let now = snapshot(client)?;
        rates = Rates::between(then, &now);
        *then = now;
        next = Instant::now() + interval;
    }
}

fn draw(frame: &mut Frame, stats: &Stats, rates: &Rates) {
    let [title, vips, clusters, backends, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(rates.vips.len() as u16 + 3),
        Constraint::Length(rates.clusters.len() as u16 + 3),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let c = &stats.conntrack;
    frame.render_widget(
        Line::from(format!(
            "xlb {} · rates over {:.1} s · connection table {} / {} · q to quit",
            stats.version,
            rates.interval_secs,
            si(c.entries as f64, ""),
            si(c.capacity as f64, ""),
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    for (area, label, rows) in [
        (vips, "VIPs", &rates.vips),
        (clusters, "clusters", &rates.clusters),
        (backends, "backends", &rates.backends),
    ] {
        frame.render_widget(rate_table(label, rows), area);
    }
    let drops: u64 = stats
        .counters
        .iter()
        .filter(|(name, _)| name.starts_with("drop_"))
        .map(|(_, v)| v)
        .sum();
    frame.render_widget(
        Line::from(format!(
            "dropped (all reasons): {} · `xlb stats` for every counter",
            si(drops as f64, "pkt")
        )),
        footer,
    );
}

fn rate_table<'a>(label: &'a str, rows: &'a [RateRow]) -> Table<'a> {
    let header = Row::new([
        label,
        "",
        "packets/s",
        "bits/s",
        "new flows/s",
        "packets",
        "bytes",
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let body = rows.iter().map(|r| {
        let mut cells = vec![r.name.clone(), r.detail.clone()];
        cells.extend(traffic_cells(r).into_iter().take(5));
        Row::new(cells)
    });
    Table::new(
        body,
        [
            Constraint::Min(18),
            Constraint::Min(24),
            Constraint::Length(12),
            Constraint::Length(13),
            Constraint::Length(14),
            Constraint::Length(10),
            Constraint::Length(10),
        ],
    )
    .header(header)
    .block(Block::bordered())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::VipStats;

    #[test]
    fn si_prefixes_three_digits() {
        assert_eq!(si(0.0, "pps"), "0 pps");
        assert_eq!(si(999.0, "B"), "999 B");
        assert_eq!(si(1234.0, "B"), "1.23 kB");
        assert_eq!(si(45_600_000.0, "bit/s"), "45.6 Mbit/s");
        assert_eq!(si(2.5, "/s"), "2.50 /s");
        assert_eq!(si(7.0, ""), "7");
    }

    fn stats_at(t: f64, packets: u64) -> Stats {
        Stats {
            taken_at: t,
            version: "test".into(),
            attachments: vec![],
            vips: vec![VipStats {
                name: "web".into(),
                addr: "198.18.100.1".parse().unwrap(),
                port: 80,
                proto: crate::api::Protocol::Tcp,
                traffic: TrafficStats {
                    packets,
                    bytes: packets * 100,
                    new_flows: packets / 10,
                },
            }],
            clusters: vec![],
            backends: vec![],
            counters: vec![("tx".into(), packets)],
            conntrack: Default::default(),
            last_reconcile_micros: None,
        }
    }

    #[test]
    fn rates_are_differences_over_the_daemons_own_times() {
        let rates = Rates::between(&stats_at(10.0, 1000), &stats_at(12.0, 3000));
        assert_eq!(rates.interval_secs, 2.0);
        assert_eq!(rates.vips[0].rate.packets_per_sec, 1000.0);
        assert_eq!(rates.vips[0].rate.bytes_per_sec, 100_000.0);
        assert_eq!(rates.vips[0].rate.new_flows_per_sec, 100.0);
        assert_eq!(rates.counters, vec![("tx".to_owned(), 3000, 1000.0)]);
    }

    #[test]
    fn a_counter_that_went_down_has_no_rate() {
        let rates = Rates::between(&stats_at(10.0, 5000), &stats_at(11.0, 10));
        assert_eq!(rates.vips[0].rate.packets_per_sec, 0.0);
    }
}
