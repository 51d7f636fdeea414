//! What the applier tells the uploads task: registrations that arrived and
//! uploads that were withdrawn (deleted or expired) through the log.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Registered(String),
    Withdrawn(String),
}

#[derive(Default, Debug)]
pub struct Events {
    queue: Mutex<Vec<Event>>,
    notify: Notify,
}

impl Events {
    pub fn push(&self, event: Event) {
        self.queue.lock().expect("not poisoned").push(event);
        self.notify.notify_one();
    }

    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.queue.lock().expect("not poisoned"))
    }

    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}
