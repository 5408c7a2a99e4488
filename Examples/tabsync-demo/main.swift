// tabsync-demo: the TabSync story told by a development token server and several `tab`
// processes sharing one session. A file named main.swift holds top-level code, not @main.
import ArgumentParser

TabSyncDemo.main()
