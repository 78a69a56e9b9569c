-- item vocabulary, fitted on train rows only: item_idx 1..n in item_id order, 0 = unknown

with

train_events as (

    select item_id
    from {{ ref('int_split') }}
    where split = 'train'

),

counted as (

    select
        item_id,
        count(*) as n_train_events
    from train_events
    group by item_id

),

indexed as (

    select
        {{ dbt.cast('row_number() over (order by item_id)', dbt.type_int()) }} as item_idx,
        item_id,
        {{ dbt.cast('n_train_events', dbt.type_int()) }} as n_train_events
    from counted

)

select * from indexed
