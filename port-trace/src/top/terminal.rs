//! The real terminal for `port-trace top`: raw mode and the alternate
//! screen while it runs, restored on every way out (drop, panic), and keys
//! read on a background thread.

use std::io::{self, IsTerminal, Stdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use crossterm::cursor::{Hide, Show};
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::execute;
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

use super::ui;
use super::view::TopView;

/// Whether the terminal is in raw mode on the alternate screen (ours to restore).
static SCREEN_ACTIVE: AtomicBool = AtomicBool::new(false);

/// How long the key thread waits for input before checking whether to stop.
const KEY_POLL: Duration = Duration::from_millis(100);

/// Puts the terminal back (cooked mode, main screen, cursor shown) if a
/// [`Screen`] had taken it. Idempotent; [`Screen`]'s drop and the panic hook
/// call it, and so may a caller about to `std::process::exit`.
pub fn restore_terminal() {
    if SCREEN_ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    }
}

/// Installs, once per process, a panic hook that restores the terminal
/// before the previous hook prints the panic (else the message would be
/// lost on the alternate screen and the shell left in raw mode).
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// The terminal while `top` runs.
pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    keys: Receiver<KeyEvent>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Screen {
    /// Takes the terminal: raw mode, alternate screen, hidden cursor, and a
    /// thread reading keys. Fails when standard output is not a terminal.
    pub fn enter() -> io::Result<Screen> {
        if !io::stdout().is_terminal() {
            return Err(io::Error::other("port-trace top needs a terminal on standard output"));
        }
        install_panic_hook();
        enable_raw_mode()?;
        SCREEN_ACTIVE.store(true, Ordering::SeqCst);
        let setup = execute!(io::stdout(), EnterAlternateScreen, Hide)
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())))
            .and_then(|mut terminal| terminal.clear().map(|()| terminal));
        let terminal = match setup {
            Ok(terminal) => terminal,
            Err(err) => {
                restore_terminal();
                return Err(err);
            }
        };
        let (sender, keys) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let reader_stop = Arc::clone(&stop);
        let reader =
            std::thread::Builder::new().name("top-keys".to_string()).spawn(move || read_keys(&sender, &reader_stop));
        let reader = match reader {
            Ok(handle) => handle,
            Err(err) => {
                restore_terminal();
                return Err(err);
            }
        };
        Ok(Screen { terminal, keys, stop, reader: Some(reader) })
    }

    /// Draws the view at `now_ns` (CLOCK_BOOTTIME).
    pub fn draw(&mut self, view: &mut TopView, now_ns: u64) -> io::Result<()> {
        self.terminal.draw(|frame| ui::render(frame, view, now_ns))?;
        Ok(())
    }

    /// The keys pressed since the last call; never blocks.
    pub fn poll_keys(&mut self) -> Vec<KeyEvent> {
        self.keys.try_iter().collect()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        restore_terminal();
        if let Some(reader) = self.reader.take() {
            // Returns within one KEY_POLL.
            let _ = reader.join();
        }
    }
}

/// Forwards key events until told to stop or nobody listens. If the input
/// cannot be read any more, sends Ctrl-C so the view quits rather than
/// leaving the user in a screen that no key reaches.
fn read_keys(sender: &Sender<KeyEvent>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let next = match event::poll(KEY_POLL) {
            Ok(false) => continue,
            Ok(true) => event::read(),
            Err(err) => Err(err),
        };
        let sent = match next {
            Ok(Event::Key(key)) => sender.send(key),
            Ok(_) => Ok(()),
            Err(_) => {
                let _ = sender.send(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
