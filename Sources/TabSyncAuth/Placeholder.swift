import TabSync
